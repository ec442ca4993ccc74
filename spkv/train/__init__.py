"""SP-KV training (`spkv train`): adapt a pretrained model so it learns when to write.

config.py holds the settings (also the CLI's flags), schedule.py the learning rate, phases and
density regulariser, loop.py the data, model, checkpoints and the loop itself.
"""

from spkv.train.config import TrainConfig
from spkv.train.loop import train

__all__ = ["TrainConfig", "train"]
