"""Started by test_evaluation under torchrun: sample features split across processes, rank 0 saves them."""

import sys

import numpy as np
import torch
from accelerate import PartialState

from conftest import TinyFeatureExtractor, tiny_pixel_pipeline
from dit_optimum.evaluation.sampling import sample_features

if __name__ == "__main__":
    output, num_samples = sys.argv[1], int(sys.argv[2])
    state = PartialState(cpu=True)
    result = sample_features(
        tiny_pixel_pipeline(),
        num_samples,
        {"tiny": TinyFeatureExtractor()},
        batch_size=3,
        num_inference_steps=3,
        keep_images=4,
        state=state,
    )
    if state.is_main_process:
        np.savez(output, world=state.num_processes, kept=len(result.images), **result.features)
    if state.num_processes > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()  # exiting with gloo's threads running can abort the process
