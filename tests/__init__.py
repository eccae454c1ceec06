import os

import torch

# The test models are tiny: one thread is much faster than two fighting over 2 cores (30x measured
# while another process was busy), and it keeps timings stable in CI.
torch.set_num_threads(1)

# Ray's single-machine setting, before anything imports ray: the local Ray cluster of tests/test_ray_serve.py
# keeps every address on 127.0.0.1 (that test checks it).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
