"""`examples/train_mpsm.py`, then each process writes the hash of its trained weights (for tests/test_distributed.py).

    accelerate launch ... tests/train_and_hash.py HASH_FILE_PATTERN TRAIN_MPSM_ARGS...

`HASH_FILE_PATTERN` holds `{rank}`, e.g. `/tmp/hash_{rank}.txt`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hooks import state_hash  # noqa: E402
from tiny import load_script  # noqa: E402


def main():
    pattern, argv = sys.argv[1], sys.argv[2:]
    script = load_script("examples/train_mpsm.py")
    train_loop = script.train_loop

    def train_and_hash(accelerator, model, *args, **kwargs):
        state = train_loop(accelerator, model, *args, **kwargs)
        with open(pattern.format(rank=accelerator.process_index), "w", encoding="utf-8") as file:
            file.write(state_hash(accelerator.unwrap_model(model)) + "\n")
        return state

    script.train_loop = train_and_hash
    return script.main(argv)


if __name__ == "__main__":
    sys.exit(main())
