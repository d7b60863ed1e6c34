"""keeltune: distributed fine-tuning of large language models."""

import logging

# torchao (imported by peft when installed; keeltune uses its NF4 for a sharded 4-bit base) registers enums with
# torch at import and logs, on every process, two deprecation warnings and the GPU kernels it cannot load here
for _name in ("torch.utils._pytree", "torchao"):
    logging.getLogger(_name).setLevel(logging.ERROR)
