#!/usr/bin/env python
"""CPU training speed and memory: ours against mlx-lm's LoRA trainer on the same small model and batches.

The same machinery as ``gpu_train.py`` (every configuration in its own process, the peer in the same
run), with a CPU-sized default: ``--preset small`` (hidden 256, 4 layers, vocab 32000), float32.

  python benchmarks/train.py                 # prints the table
  python benchmarks/train.py --json out.json
"""

import sys

from gpu_train import main

if __name__ == "__main__":
    if "--preset" not in sys.argv:
        sys.argv[1:1] = ["--preset", "small", "--shapes", "4x256,1x512", "--checkpointing", "off"]
    main()
