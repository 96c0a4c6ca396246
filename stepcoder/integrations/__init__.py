"""StepCoder's parts inside the RL stacks users already run: TRL (``stepcoder.integrations.trl``), veRL
(``stepcoder.integrations.verl``) and OpenRLHF (``stepcoder.integrations.openrlhf``). Each module imports
its stack lazily, so this package never needs any of them installed."""
