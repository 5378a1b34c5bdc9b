"""Opening the models a config names, wherever they are: a local path, a hub id
(:mod:`neuromerge.io.hub`) or mergekit's ``model+lora`` (the adapter formed over that model
tensor by tensor, :class:`~neuromerge.io.lora.LoraExpertReader`). A bare adapter folder among
the experts is formed over the merge's base, as before."""

from __future__ import annotations

import logging
from pathlib import Path

from neuromerge.errors import InputError
from neuromerge.io.hub import Hub, HubModel, HubRef, ModelRef, Side
from neuromerge.io.lora import LoraExpertReader, is_adapter_folder
from neuromerge.io.reader import CheckpointReader, open_checkpoint

log = logging.getLogger("neuromerge")


class ModelOpener:
    """Readers for :class:`~neuromerge.io.hub.ModelRef` s. With ``headers_only`` a hub model
    whose weights are not cached is read from its safetensors headers (``remote`` then turns
    True: re-open with ``headers_only=False`` to merge); a hub model stored as ``.bin`` only is
    downloaded first, or refused when ``download_bin`` is False (``--dry-run``)."""

    def __init__(self, hub: Hub | None = None, *, headers_only: bool = False,
                 download_bin: bool = True) -> None:
        self._hub = hub
        self.headers_only = headers_only
        self.download_bin = download_bin
        self.remote = False
        self.models: dict[HubRef, HubModel] = {}

    @property
    def hub(self) -> Hub:
        if self._hub is None:
            self._hub = Hub()
        return self._hub

    def folder(self, side: Side) -> Path:
        """The local folder of one side of a ref (a hub repo's snapshot in the cache)."""
        return side if isinstance(side, Path) else self._fetch(side).folder

    def path(self, ref: ModelRef) -> Path:
        """Where a model's config.json and tokenizer are (the model side of ``model+lora``)."""
        return self.folder(ref.model)

    def base(self, ref: ModelRef) -> CheckpointReader:
        if ref.lora is not None:
            return self._adapter(ref.lora, self._checkpoint(ref.model))
        if is_adapter_folder(self.folder(ref.model)):
            raise InputError(f"{ref.text}: base_model is a LoRA adapter folder; the base must "
                             f"be the full pretrained model (adapters go under models, or "
                             f"write MODEL+ADAPTER)")
        return self._checkpoint(ref.model)

    def expert(self, ref: ModelRef, base: ModelRef) -> CheckpointReader:
        if ref.lora is not None:
            return self._adapter(ref.lora, self._checkpoint(ref.model))
        if is_adapter_folder(self.folder(ref.model)):
            return self._adapter(ref.model, self.base(base))  # over the merge's base
        return self._checkpoint(ref.model)

    def commits(self, ref: ModelRef) -> dict[str, str]:
        """{repo id: the commit it resolved to} for the hub sides of ``ref`` (none when local)."""
        return {side.repo_id: self.models[side].commit for side in (ref.model, ref.lora)
                if isinstance(side, HubRef) and side in self.models}

    def _fetch(self, ref: HubRef) -> HubModel:
        model = self.hub.fetch(ref)
        self.models[ref] = model
        return model

    def _checkpoint(self, side: Side) -> CheckpointReader:
        if isinstance(side, Path):
            return open_checkpoint(side)
        model = self._fetch(side)
        heads = self._headers(model)
        return heads if heads is not None else open_checkpoint(model.folder)

    def _adapter(self, side: Side, over: CheckpointReader) -> LoraExpertReader:
        folder = self.folder(side)
        if not is_adapter_folder(folder):
            over.close()
            raise InputError(f"{side}: not a LoRA adapter (no adapter_config.json), so it "
                             f"cannot be the ADAPTER of MODEL+ADAPTER")
        weights = self._headers(self._fetch(side)) if isinstance(side, HubRef) else None
        return LoraExpertReader(over, folder, weights=weights)

    def _headers(self, model: HubModel) -> CheckpointReader | None:
        """A header-only reader of a hub model's weights while planning; None once they are
        local (downloaded here when needed)."""
        if model.cached():
            return None
        if self.headers_only and model.safetensors:
            self.remote = True
            return self.hub.headers(model)
        if self.headers_only and not self.download_bin:
            raise InputError(f"{model.ref}: stores PyTorch .bin weights only, whose tensor "
                             f"names and shapes are known only once downloaded, and --dry-run "
                             f"downloads no weights (a merge downloads and checks them first)")
        if self.headers_only:
            log.warning("%s stores PyTorch .bin weights only: downloaded before the merge is "
                        "planned (safetensors headers would be read remotely)", model.ref)
        self.hub.download(model)
        return None
