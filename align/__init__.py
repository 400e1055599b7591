"""align: SFT -> reward model -> PPO / DPO-family / listwise ranking, as QLoRA adapters on one 4-bit base."""

__version__ = "0.1.0"
