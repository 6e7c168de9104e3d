"""One pipeline shared by several threads (a server): every call gives the image it gives alone, bit for bit,
with mixed guidance scales, step counts and multistep schedulers (each call samples with its own scheduler copy and
keeps its state per thread)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

from ldm.tiny import tiny_pipeline

from conftest import sample

pytestmark = pytest.mark.usefixtures("single_thread")
CASES = [dict(guidance_scale=g, num_inference_steps=n, seed=s) for g, n, s in
         [(1.0, 3, 0), (5.0, 4, 1), (7.5, 2, 2), (3.0, 5, 3), (1.0, 4, 4), (9.0, 3, 5), (2.0, 2, 6), (6.0, 5, 7)]]


@pytest.mark.parametrize("kind, scheduler", [("unet", None), ("dit", "dpm"), ("unet", "euler")])
def test_four_threads_give_the_sequential_images(kind, scheduler):
    pipe = tiny_pipeline(kind)
    if scheduler == "dpm":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    elif scheduler == "euler":
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    cases = CASES * 2
    expected = [sample(pipe, **case) for case in cases]
    before = torch.get_num_threads()

    def call(case):
        # OpenMP's thread count is per OS thread: a new thread starts with the process default (OMP_NUM_THREADS or
        # every core), and another count splits reductions differently (1e-7 apart); give it the caller's count
        torch.set_num_threads(before)
        return sample(pipe, **case)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(call, cases))
    assert torch.get_num_threads() == before
    for case, got, want in zip(cases, results, expected):
        np.testing.assert_array_equal(got, want, err_msg=str(case))


def test_threads_tokenizing_at_once_all_get_the_padded_length():
    # a fast tokenizer's padding settings are shared state that each call rewrites (unpadded to measure the
    # prompt, then padded to 77): unguarded, about 2 % of calls from 8 threads came back unpadded
    pipe = tiny_pipeline("unet")
    max_len = pipe.tokenizer.model_max_length

    def call(i):
        ids, mask = pipe._tokenize(["a red fox"] if i % 2 else [""], torch.device("cpu"))
        return ids.shape[1], mask.shape[1]

    with ThreadPoolExecutor(max_workers=8) as pool:
        lengths = list(pool.map(call, range(2000)))
    assert lengths == [(max_len, max_len)] * len(lengths)
