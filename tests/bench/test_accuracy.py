"""Bodies built from state dicts, whatever transformers version saved the buffers."""

from pathlib import Path

import pytest
import torch

from neuromerge.bench.accuracy import accuracy, load_body
from neuromerge.examples import tiny_bert


def test_state_dict_body_tolerates_buffers_but_not_foreign_keys(tmp_path: Path) -> None:
    model = tiny_bert(seed=0)
    model.save_pretrained(str(tmp_path))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["encoder.layer.0.output.dense.bias"] += 1.0
    # an older transformers saved position_ids; a newer one treats it as a non-persistent buffer
    sd["embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    body = load_body(state_dict=sd, config_dir=tmp_path)
    assert torch.equal(body.state_dict()["encoder.layer.0.output.dense.bias"],
                       sd["encoder.layer.0.output.dense.bias"])
    with pytest.raises(RuntimeError, match=r"unexpected.*classifier.weight"):
        load_body(state_dict={**sd, "classifier.weight": torch.zeros(2, 32)}, config_dir=tmp_path)
    del sd["encoder.layer.0.output.dense.bias"]
    with pytest.raises(RuntimeError, match=r"missing.*dense.bias"):
        load_body(state_dict=sd, config_dir=tmp_path)


def test_accuracy_of_a_linear_head() -> None:
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.5]])
    head = (torch.eye(2), torch.zeros(2))
    assert accuracy(feats, head, [0, 1, 1]) == pytest.approx(2 / 3)
