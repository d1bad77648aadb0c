"""The full benchmark: numres, torch eager (NCHW, channels_last) and ONNX Runtime, interleaved.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench.py \\
        --models resnet18,resnet50 --batches 1,8,32 --sizes 224,320 --memory --json out.json

The harness is ``numres/bench.py`` (also behind ``numres bench``, with shorter defaults);
``python benchmarks/bench.py --help`` lists every option.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from numres.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
