import torch

# The test models are tiny: one thread is much faster than two fighting over 2 cores (30x measured
# while another process was busy), and it keeps timings stable in CI.
torch.set_num_threads(1)
