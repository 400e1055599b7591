"""Stage kinds, one file each (`align/stages/<kind>.py`), each registering its descriptor once in `align.stages.kind`.
Importing the package registers the built-in kinds."""

from align.stages import sft, reward, dpo, rank, kto, ppo, grpo, label  # noqa: F401, I001 - registration, in this order
