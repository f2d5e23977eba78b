"""The extraction's batched forward pass, replayed as a CUDA graph on a GPU, and its copy to the host."""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import numpy as np
import torch

from tokens.cluster import cuda_float32
from tokens.extract.backbones import Backbone

TORCH_DTYPE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class Forward:
    """The chosen layers' (patch, prefix) tokens of a batch, in the store's dtype, on the host.

    On a GPU, batches of the run's batch size replay a CUDA graph captured by warm_up(). A ViT-B
    forward pass is a few hundred kernel launches: Python issued them in 4 ms per batch on an idle
    H200 host, but in 18 ms beside the loader and writer threads of a running extraction, half of
    the GPU's own 38 ms. A replay is one launch. Other batches (the run's last, short one) run
    eagerly, and so does every batch of a backbone whose forward pass cannot be captured.

    On a GPU, the tokens are copied asynchronously into one of `slots` pinned host buffers, used
    in turn, so that the GPU goes on with the next batches. Those few buffers are all the pinned
    memory the tokens take: pinning is slow (about 1.5 GB/s on the two-GPU H200 host) and held up the
    process's other CUDA calls there, so it happens once, during the warm-up, and not for
    every shard.
    """

    def __init__(self, model: Backbone, device: torch.device, layers: list[int], dtype: str, precision: str,
                 batch_size: int, slots: int = 1):
        self.model, self.device, self.layers, self.batch_size, self.slots = model, device, layers, batch_size, slots
        self.dtype = TORCH_DTYPE[dtype]
        self.bf16 = precision == "bf16" and device.type == "cuda"
        self.precision = "bf16" if self.bf16 else "fp32"  # what runs (CPU runs are always fp32): the store records it
        self.graph: torch.cuda.CUDAGraph | None = None
        self.not_graphed = ""  # on a GPU: why full batches run eagerly
        self.staging: list[dict] = []  # on a GPU: the pinned host buffers, made by warm_up()
        self.launched = 0

    def place(self):
        self.model = self.model.to(self.device).eval()

    def warm_up(self):
        """Place the model and run a blank batch of the run's shapes; on a GPU, capture it as a graph.

        A process's first forward pass sets up CUDA, cuBLAS and cuDNN and loads its kernels (2.2 s
        for a ViT-B on a quiet H200 host, context included); the blank batch has the shapes of real
        ones, so the kernels chosen are those of the run, and its outputs give the shapes of the
        pinned host buffers.
        """
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # the current device is per thread (this runs on one)
        self.place()
        inputs, masks = self._blank_batch()
        with torch.inference_mode():
            if self.device.type != "cuda":
                self._eager(inputs, masks)
                return
            side = torch.cuda.Stream(self.device)  # as torch.cuda.graph asks: warm up off the default stream
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                outputs, self.not_graphed = self._sync_in_eager_pass(inputs, masks)
                if not self.not_graphed:
                    self._capture(inputs, masks, side)
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
        self.staging = [{layer: tuple(None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in pair)
                         for layer, pair in outputs.items()} for _ in range(self.slots)]

    def _sync_in_eager_pass(self, inputs: torch.Tensor, masks: torch.Tensor) -> tuple[dict, str]:
        """Run the eager pass, failing on any operation that waits for the GPU (.item(), a host-side
        branch on a tensor); return its outputs and that failure, or "" if there was none.

        Such an operation cannot be captured, and a capture that fails on one reports a later error
        instead of it and keeps the memory it had taken (torch 2.11), so it is looked for first.
        The mode is the process's: meanwhile the main thread, checking the dataset, must not wait for
        the GPU either; what it reads of the model (Backbone.final_norm_params) is read before the
        model goes there.
        """
        # torch warns that this mode is a prototype, on every run: the user has nothing to act on
        warnings.filterwarnings("ignore", message="Synchronization debug mode is a prototype", category=UserWarning)
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return self._eager(inputs, masks), ""
        except RuntimeError as error:
            if "synchronizing" not in str(error):
                raise
            found = str(error).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        return self._eager(inputs, masks), found  # the warm-up, all the way through

    def _capture(self, inputs: torch.Tensor, masks: torch.Tensor, stream: torch.cuda.Stream):
        graph = torch.cuda.CUDAGraph()
        try:
            # On this device's stream (torch.cuda.graph's own is made once, on the first device it
            # meets); thread_local: other threads (the DataLoader's pinning thread) may call CUDA meanwhile.
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                outputs = self._eager(inputs, masks)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as error:  # what the check for synchronizing operations cannot see
            self.not_graphed = str(error.__context__ or error).splitlines()[0]
            return
        self.graph, self.static_inputs, self.static_masks, self.static_outputs = graph, inputs, masks, outputs

    def _blank_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.model.modality == "audio":
            blank = np.zeros(self.model.window_samples or self.model.sample_rate, np.float32)
        else:
            from PIL import Image

            blank = Image.new("RGB", (224, 224))
        inputs, mask = self.model.preprocess(blank)
        expand = (self.batch_size, *inputs.shape), (self.batch_size, *mask.shape)
        return inputs.expand(expand[0]).to(self.device).contiguous(), mask.expand(expand[1]).to(self.device).contiguous()

    def _eager(self, inputs: torch.Tensor, masks: torch.Tensor) -> dict:
        # no weight-cast cache: a graph must cast inside itself, and one forward pass uses each weight once
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if self.bf16 else nullcontext()
        # What runs in float32 (all of an fp32 run; the fbank of a bf16 one) is IEEE float32, not cuDNN's
        # default TF32 convolutions: the store records fp32. A graph keeps the kernels chosen at capture.
        float32 = cuda_float32("ieee") if self.device.type == "cuda" else nullcontext()
        with autocast, float32:
            outputs = self.model(inputs, self.layers, masks)
        return {layer: (patch.to(self.dtype), None if prefix is None else prefix.to(self.dtype))
                for layer, (patch, prefix) in outputs.items()}

    def __call__(self, inputs: torch.Tensor, masks: torch.Tensor) -> tuple[dict, torch.cuda.Event | None]:
        """Launch the forward pass of a batch (pinned host tensors on a GPU) and the copy of its tokens
        to the host. Returns the host tokens and, on a GPU, the event after which they are there;
        they are overwritten `slots` calls later."""
        with torch.inference_mode():
            if self.graph is not None and inputs.shape == self.static_inputs.shape and masks.shape == self.static_masks.shape:
                self.static_inputs.copy_(inputs, non_blocking=True)
                self.static_masks.copy_(masks, non_blocking=True)
                self.graph.replay()
                outputs = self.static_outputs
            else:
                outputs = self._eager(inputs.to(self.device, non_blocking=True), masks.to(self.device, non_blocking=True))
            if self.device.type != "cuda":
                return outputs, None
            host = self.staging[self.launched % self.slots]
            self.launched += 1
            n = len(inputs)
            for layer, pair in outputs.items():
                for source, target in zip(pair, host[layer]):
                    if source is not None:
                        target[:n].copy_(source, non_blocking=True)
            landed = torch.cuda.Event(blocking=True)  # its waiter sleeps rather than spinning a core
            landed.record(torch.cuda.current_stream(self.device))
            return {layer: tuple(None if t is None else t[:n] for t in pair) for layer, pair in host.items()}, landed
