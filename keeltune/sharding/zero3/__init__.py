"""DeepSpeed ZeRO-3 full fine-tuning: parameters, gradients and optimizer state partitioned over the ranks.

``ops`` builds DeepSpeed's JIT ops, ``loading`` streams weights into the partitioned model, ``backend`` is the
training backend, ``export`` joins a checkpoint's partitions into a Hugging Face folder. The backend registry
(``keeltune.config.backends``) reaches ``build`` and ``export_checkpoint`` here.
"""

from keeltune.sharding.zero3.backend import build
from keeltune.sharding.zero3.export import export_checkpoint

__all__ = ["build", "export_checkpoint"]
