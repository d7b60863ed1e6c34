"""``python -m keeltune.sharding.zero3``: build DeepSpeed's ops once, at set-up."""

import sys

from keeltune.sharding.zero3.ops import main

sys.exit(main())
