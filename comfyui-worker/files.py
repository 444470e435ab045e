"""The stages of a job that deal with files: validate, stage inputs, collect, deliver.

They sit between the queue and ComfyUI: what a participant's workflow may read is checked and
fetched before the prompt runs, and what it wrote is gathered, capped and delivered before the
job is reported. Error text that reaches the participant names files as they wrote them, never
the worker's own folders.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from comfy_client import ComfyClient, ComfyUnavailable
from config import Config
from delivery import Delivery, ExchangeDelivery, LocalDelivery
from exchange import ExchangeClient
from inputs import (
    ExchangeInputs,
    InputStager,
    LocalInputs,
    file_inputs_from_object_info,
    find_inputs,
    rewrite,
)
from jobs import ClaimedJob, JobFailure, validate_job
from outputs import collect, enforce_caps, job_dir, published, remove_tree, tag_workflow
from pipeline import JobRun, scrub

log = logging.getLogger("comfyui_worker.files")


class FileStages:
    """The file stages of the pipeline, wired to one input source and one delivery."""

    @classmethod
    def from_config(
        cls, cfg: Config, comfy: ComfyClient
    ) -> tuple[FileStages, ExchangeClient | None]:
        """The stages OUTPUT_DELIVERY asks for, and the exchange client they share (if any)."""
        if cfg.output_delivery != "exchange":
            stager = InputStager(
                LocalInputs(cfg.inputs_dir), cfg.comfyui_inputs, cfg.input_max_job_bytes
            )
            return cls(cfg, stager, LocalDelivery(), comfy), None
        exchange = ExchangeClient(cfg.exchange_url, cfg.exchange_token, cfg.exchange_timeout)
        stager = InputStager(
            ExchangeInputs(exchange, cfg.delivery_timeout, cfg.backoff_max),
            cfg.comfyui_inputs,
            cfg.input_max_job_bytes,
        )
        delivery = ExchangeDelivery(
            exchange,
            cfg.staging_dir,
            cfg.delivery_timeout,
            cfg.backoff_max,
            cfg.output_retain,
            cfg.output_verify == "checksum",
            cfg.host_path,
        )
        return cls(cfg, stager, delivery, comfy), exchange

    def give_up_when(self, give_up: Callable[[], bool]) -> None:
        """Transfers that keep failing stop retrying once `give_up` says so (a stopping worker)."""
        if isinstance(self.delivery, ExchangeDelivery):
            self.delivery.give_up = give_up
        if isinstance(self.stager.source, ExchangeInputs):
            self.stager.source.give_up = give_up

    def __init__(
        self,
        cfg: Config,
        stager: InputStager,
        delivery: Delivery,
        comfy: ComfyClient,
        extra_file_inputs: Mapping[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.stager = stager
        self.delivery = delivery
        self.comfy = comfy
        # File inputs of other node packs, from ComfyUI's upload flags: read once, on first use.
        self.extra_file_inputs = None if extra_file_inputs is None else dict(extra_file_inputs)

    async def discover(self) -> None:
        """Read /object_info once; raises ComfyUnavailable (the worker waits and asks again)."""
        found = file_inputs_from_object_info(await self.comfy.object_info())
        self.extra_file_inputs = found
        log.info(
            "file inputs from ComfyUI's upload flags: %s",
            ", ".join(f"{k}.{'/'.join(v)}" for k, v in sorted(found.items())) or "none",
        )

    async def validate(self, run: JobRun) -> bool:
        """The job's shape, then every file input and save prefix, before anything is spent."""
        job = run.job
        validate_job(job, self.cfg.max_job_bytes)
        run.inputs = find_inputs(job.workflow, self.extra_file_inputs or {})
        run.workflow = rewrite(tag_workflow(job.workflow, job.id), run.inputs, job.id)
        return True

    async def stage_inputs(self, run: JobRun) -> bool:
        if not run.inputs:
            return True
        job = run.job

        async def remove() -> None:
            self.stager.remove(job.id)

        run.cleanups.append(remove)
        await self.stager.stage(job.id, job.user_id, run.inputs)
        return True

    async def collect(self, run: JobRun) -> bool:
        job, outcome = run.job, run.outcome
        assert outcome is not None
        if run.inputs:
            self.stager.remove(job.id)  # ComfyUI is done with them: gone before "completed"
        root = self.cfg.collect_root
        run.folder = job_dir(root, job.user_id, job.id)
        try:
            run.files = await collect(
                outcome.outputs, run.folder, job.id, self.comfy, self.cfg.comfyui_output_dir
            )
            enforce_caps(run.files, self.cfg.output_max_file_bytes, self.cfg.output_max_job_bytes)
        except ComfyUnavailable as exc:
            remove_tree(run.folder, root)
            raise JobFailure("outputs", f"could not fetch outputs from ComfyUI: {exc}") from exc
        except OSError as exc:
            remove_tree(run.folder, root)
            raise JobFailure("outputs", f"could not store the outputs: {exc.strerror}") from exc
        except JobFailure:
            remove_tree(run.folder, root)
            raise
        return True

    async def deliver(self, run: JobRun) -> bool:
        await self.delivery.deliver(run.job.user_id, run.job.id, run.folder, run.files)
        return True

    def published(self, run: JobRun) -> list[dict[str, Any]]:
        return published(run.files, self.cfg.collect_root)

    def scrub(self, job: ClaimedJob, failure: JobFailure) -> JobFailure:
        """Replace this worker's folders in an error with the names the participant knows."""
        if failure.kind == "delivery":
            return failure  # it names, on purpose, where the admin finds the files
        inputs = self.cfg.comfyui_inputs
        replacements = [
            (os.path.join(inputs, job.id) + "/", ""),
            (f"{job.id}/", ""),
            (inputs + "/", ""),
        ]
        for folder, label in (
            (self.cfg.comfyui_output_dir, "<output>"),
            (self.cfg.staging_dir, "<staging>"),
            (self.cfg.outputs_dir, "<outputs>"),
            (self.cfg.inputs_dir, "<inputs>"),
        ):
            if folder:
                replacements.append((folder, label))
        return scrub(failure, replacements)
