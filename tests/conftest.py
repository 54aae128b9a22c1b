"""Keep test runs to one thread: several developers share two cores."""

import torch

torch.set_num_threads(1)
