"""Parameter count and the time of one forward + backward at paper size (vocab 8481, embed 1024, sim 256,
3 KGID layers): a batch of 32 image-caption pairs (32 x 32 scored pairs), 36 regions x 2048, 14-token captions.

    python benchmarks/train_step.py [--repeats 3]
"""

import argparse
import time
import warnings

import torch

from modeling_mpsm import MPSMConfig, MPSMModel


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*boxes.*")
    torch.manual_seed(0)
    model = MPSMModel(MPSMConfig()).train()
    print(f"parameters: {model.num_parameters():,}")
    batch = args.batch_size
    corners = torch.rand(batch, 36, 2) * 0.6
    inputs = dict(region_features=torch.randn(batch, 36, 2048).relu(), boxes=torch.cat([corners, corners + 0.3], -1),
                  input_ids=torch.randint(4, 8481, (batch, 14)), return_loss=True)
    for repeat in range(args.repeats):
        started = time.perf_counter()
        model(**inputs).loss.backward()
        print(f"forward + backward {repeat + 1}: {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    main()
