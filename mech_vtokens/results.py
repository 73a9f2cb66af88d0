"""Result objects: small, reduced, with ``.to_pandas()`` in long format (named columns, one row per observation)."""

from __future__ import annotations


class Result:
    """Base result: ``to_pandas()`` builds a long-format DataFrame; ``plot()`` draws it where a picture helps."""

    name = "result"

    def to_pandas(self):
        raise NotImplementedError

    def __repr__(self) -> str:
        df = self.to_pandas()
        return f"{type(self).__name__}({len(df)} rows; columns: {', '.join(df.columns)})"

    def _repr_html_(self):  # notebooks: the table's head
        return self.to_pandas().head(20).to_html()


class InterventionResult(Result):
    """What an intervention returns from ``run``: which one ran (interventions change the forward; nothing to
    reduce)."""

    name = "intervention"

    def __init__(self, intervention, **facts):
        self.intervention = intervention
        self.facts = facts

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame([{"intervention": repr(self.intervention), **self.facts}])


def visual_index_frame(batch):
    """Columns identifying each visual token of a batch, in ``batch.visual_positions`` order."""
    import pandas as pd

    pos = batch.visual_positions
    t = batch.tokens
    return pd.DataFrame({
        "row": pos[:, 0].numpy(), "position": pos[:, 1].numpy(), "visual_index": range(len(pos)),
        "image": t["image"].numpy(), "tile": t["tile"].numpy(), "grid_row": t["row"].numpy(),
        "grid_col": t["col"].numpy()})


def token_frame(batch, selection):
    """Identity columns (row, image, position, visual_index) of the positions ``selection`` (batch, seq) bool picks,
    in ``selection.nonzero()`` order; text positions get image = visual_index = -1."""
    import pandas as pd
    import torch

    pos = selection.nonzero()
    vm = batch.visual_mask
    vindex = torch.full(vm.shape, -1, dtype=torch.long)
    vindex[vm] = torch.arange(int(vm.sum()))
    vi = vindex[pos[:, 0], pos[:, 1]]
    img = torch.full_like(vi, -1)
    if int(vm.sum()):
        img[vi >= 0] = batch.tokens["image"][vi[vi >= 0]]
    return pd.DataFrame({"row": pos[:, 0].numpy(), "image": img.numpy(), "position": pos[:, 1].numpy(),
                         "visual_index": vi.numpy()})
