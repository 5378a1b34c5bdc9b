"""Parameter types shared by several methods: declared once, with bounds and the text that
``neuromerge methods`` and docs/methods.md show."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

Density = Annotated[float, Field(
    gt=0, le=1,
    description="fraction of each task vector's entries kept by the magnitude trim "
                "(1 keeps all; TIES' k = ceil(density * N))",
)]
TrimScope = Annotated[Literal["global", "tensor"], Field(
    description="global: one threshold per task over all merged tensors of the model "
                "(TIES paper, NeuroMerging code); tensor: each tensor trimmed on its own "
                "(mergekit's TIES)",
)]
TrimCount = Annotated[Literal["ceil", "floor"], Field(
    description="how many entries a density keeps of n: ceil: k = ceil(density * n), ties at "
                "the threshold kept (TIES paper, NeuroMerging); floor: mergekit's k = "
                "max(1, int(density * n))",
)]
DropRate = Annotated[float, Field(
    ge=0, lt=1, description="probability p of dropping each task-vector entry (DARE); "
                            "survivors are rescaled by 1/(1-p)",
)]
Seed = Annotated[int, Field(
    ge=0, description="seed of the random drop; each model gets its own stream derived from it "
                      "and the model's path (or its per-model `seed`), so order does not matter",
)]

Alpha = Annotated[float, Field(
    description="α, the scale of the merged task vector: θ = θ0 + α·τ_merged",
)]
TallLambda = Annotated[float, Field(
    ge=0, description="λ of the TALL masks: task t keeps an entry where |τt| > λ·|τ_MTL - τt| "
                      "(τ_MTL the unscaled multi-task vector); the paper picks it per task on "
                      "validation from 0.2-0.6",
)]
ConsensusK = Annotated[int, Field(
    ge=0, description="k: keep an entry where at least k tasks' TALL masks keep it (2 drops "
                      "'selfish' and 'catastrophic' weights, 1 only catastrophic ones, 0 none; "
                      "k > number of tasks keeps none)",
)]

Weight = Annotated[float, Field(
    description="w_t, a model's weight: its task vector is multiplied by it (mergekit's "
                "`weight`; set per model under models[i].parameters, this value is the default)",
)]
Normalize = Annotated[bool, Field(
    description="divide the merged task vector by the sum of the weights (of the models that "
                "agree with the elected sign, for TIES-style methods), as mergekit's `normalize`",
)]
Rescale = Annotated[bool, Field(
    description="scale DARE's surviving entries by 1/(1-p) (mergekit's `rescale`)",
)]
