"""The main experiment: trace, cache and analyse how an MoE routes tokens, and write one report.

    uv run exp/basic_routing_analysis.py                      # offline, the embedded model
    uv run exp/basic_routing_analysis.py --model allenai/OLMoE-1B-7B-0924 \
        --datasets fineweb,gsm8k,humaneval --checkpoints auto --device cuda --dtype bfloat16 --wandb

The study lives in the library (``core.pipeline``, its command line in
``core.commands.basic_routing_analysis``); this file only runs it.
"""

import sys

from core.commands.basic_routing_analysis import main
from core.pipeline.run import BasicRoutingAnalysis  # noqa: F401  the seed's import: from exp.basic_routing_analysis import BasicRoutingAnalysis

if __name__ == "__main__":
    sys.exit(main())
