"""Test-only nodes for the REAL ComfyUI, twins of the stand-in's StandIn* nodes.

The contract tests copy this file into the custom_nodes folder of a real ComfyUI they start, so the
same sleep, failure and out-of-memory workflows run against both servers and their events can be
compared. It runs inside ComfyUI's process (torch and comfy are importable there).
"""

import time
from typing import ClassVar

import comfy.model_management
import comfy.utils
import torch


class _ImageNode:
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = "standin/testing"

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("NaN")  # always run, like the stand-in's test nodes

    @staticmethod
    def _image(images):
        return images if images is not None else torch.zeros([1, 8, 8, 3])


class StandInSleep(_ImageNode):
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seconds": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 86400.0}),
                "steps": ("INT", {"default": 10, "min": 1, "max": 100000}),
            },
            "optional": {"images": ("IMAGE",)},
        }

    def run(self, seconds, steps, images=None):
        bar = comfy.utils.ProgressBar(steps)
        for step in range(steps):
            time.sleep(seconds / steps)
            comfy.model_management.throw_exception_if_processing_interrupted()
            bar.update_absolute(step + 1)
        return (self._image(images),)


class StandInRaise(_ImageNode):
    EXCEPTIONS: ClassVar[dict[str, type[Exception]]] = {
        "RuntimeError": RuntimeError,
        "ValueError": ValueError,
        "FileNotFoundError": FileNotFoundError,
        "Exception": Exception,
    }

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "message": ("STRING", {"default": "stand-in failure"}),
                "exception": (sorted(cls.EXCEPTIONS), {"default": "RuntimeError"}),
            },
            "optional": {"images": ("IMAGE",)},
        }

    def run(self, message, exception="RuntimeError", images=None):
        raise self.EXCEPTIONS[exception](message)


class StandInOutOfMemory(_ImageNode):
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"allocate_mib": ("FLOAT", {"default": 20.0, "min": 0.0, "max": 1e9})},
            "optional": {"images": ("IMAGE",)},
        }

    def run(self, allocate_mib, images=None):
        raise torch.OutOfMemoryError(
            f"CUDA out of memory. Tried to allocate {allocate_mib:.2f} MiB. GPU 0 has a total "
            "capacity of 139.80 GiB of which 6.06 MiB is free."
        )


NODE_CLASS_MAPPINGS = {
    "StandInSleep": StandInSleep,
    "StandInRaise": StandInRaise,
    "StandInOutOfMemory": StandInOutOfMemory,
}
