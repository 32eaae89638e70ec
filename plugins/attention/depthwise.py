"""The ``depthwise`` attention plugin: DAVI-style attention over the depth (layer) axis of the
VDVAE hierarchy, at every pixel, for both the posterior and the prior chain.

The memory holds (key, value) entries, each on the grid of the resolution it was made at:

- the encoder's: one per scale, made at the end of the scale before pooling. The value is the
  activation kept there, which also flows on as the residual (so the VDVAE encoder is
  unchanged); the key is a 1x1 projection of it to ``query_width`` channels.
- the decoder's: one per top-down block (but the last, which nobody reads after): the state
  the block leaves as the value, a 1x1 projection of it as the key.

Top-down block ``l`` at resolution R owns a query block, a residual block of the model's block
type that maps the state it starts from to ``num_queries`` queries per chain. Its prior read
attends over the decoder's entries of blocks < l only (the prior never sees the image, so
sampling needs no encoder); its posterior read over those and every encoder entry. Entries of
other resolutions reach the R x R grid by lossless reshapes, never by interpolation:

- a finer entry (r > R) by space-to-depth: each pixel sees the (r/R)^2 entries under it as
  that many steps of the depth axis (done once per forward pass, in :meth:`encode`);
- a coarser entry (r < R) by the same reshapes on the reader's side: the queries go
  space-to-depth onto the r-grid, attend there, and what they read comes back
  depth-to-space, so each pixel reads the entry of the pixel covering it.

The attention weights of one query sum to 1 over all entries at each pixel; the read is
added to the state scaled by a trainable gamma that starts at 0 (one per block and chain), so
a fresh model computes exactly what the plain VDVAE computes. Several queries' reads are
combined by a 1x1 convolution (as are reads of values of different widths, when
``stage_in_width`` differs between scales).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
from keras import ops

from hvae_core.api import scales, torch_default_init

PRIOR, POSTERIOR = "prior", "posterior"
CHAINS = (PRIOR, POSTERIOR)


def space_to_depth(x: Any, factor: int) -> Any:
    """(B, r, r, L, C) -> (B, r/f, r/f, f*f*L, C): each f x f patch of pixels becomes f*f
    steps of the depth axis (patch row, patch column, then the L entries). A permutation."""
    if factor == 1:
        return x
    _, size, _, length, width = x.shape
    s = size // factor
    x = ops.reshape(x, (-1, s, factor, s, factor, length, width))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5, 6))
    return ops.reshape(x, (-1, s, s, factor * factor * length, width))


def depth_to_space(x: Any, factor: int) -> Any:
    """The inverse of :func:`space_to_depth`: (B, s, s, f*f*L, C) -> (B, s*f, s*f, L, C)."""
    if factor == 1:
        return x
    _, s, _, tokens, width = x.shape
    length = tokens // (factor * factor)
    x = ops.reshape(x, (-1, s, s, factor, factor, length, width))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5, 6))
    return ops.reshape(x, (-1, s * factor, s * factor, length, width))


@dataclass(frozen=True)
class Entries:
    """Memory entries on one grid: keys (B, r, r, L, key width), values (B, r, r, L, width)."""

    resolution: int
    keys: Any
    values: Any

    @property
    def length(self) -> int:
        return int(self.keys.shape[3])


def _on_grid(x: Any, resolution: int, factor: int) -> Any:
    """(B, R, R, ...) as (B, r, f, r, f, ...) with r = R / f: each pixel of the r-grid holds the
    f x f pixels it covers. Space-to-depth without moving a value (a reshape, not a copy)."""
    if factor == 1:
        return x
    r = resolution // factor
    return ops.reshape(x, (-1, r, factor, r, factor, *x.shape[3:]))


def _off_grid(x: Any, resolution: int, factor: int) -> Any:
    """The inverse of :func:`_on_grid`: depth-to-space, again a reshape."""
    if factor == 1:
        return x
    return ops.reshape(x, (-1, resolution, resolution, *x.shape[5:]))


def attend(queries: Any, groups: Sequence[Entries], resolution: int) -> tuple[dict[int, Any], Any]:
    """Dot-product attention over the depth axis at every pixel of the R x R grid.

    ``queries`` is (B, R, R, Q, c); every group lies on a grid of resolution <= R, and each
    pixel reads the entries of the pixel of that grid that covers it. Returns the read, summed
    over the groups whose values have one width, as {width: (B, R, R, Q, width)}, and the
    attention weights (B, R, R, Q, T) over all T entries (float32; they sum to 1 over T),
    ordered by grid, coarsest first, then as given.
    """
    scale = 1.0 / math.sqrt(int(queries.shape[-1]))
    # The groups on one grid share the reshapes that bring the queries there and back.
    grids = sorted({g.resolution for g in groups})
    on_grid = [[g for g in groups if g.resolution == r] for r in grids]
    logits = []
    for r, grid_groups in zip(grids, on_grid, strict=True):
        factor = resolution // r
        q = _on_grid(queries, resolution, factor)
        spec = "bxyqc,bxylc->bxyql" if factor == 1 else "bxiyjqc,bxylc->bxiyjql"
        scores = [ops.einsum(spec, q, ops.cast(g.keys, q.dtype)) for g in grid_groups]
        scores = scores[0] if len(scores) == 1 else ops.concatenate(scores, axis=-1)
        logits.append(_off_grid(scores, resolution, factor))  # (B, R, R, Q, L)
    logits = ops.cast(
        logits[0] if len(logits) == 1 else ops.concatenate(logits, axis=-1), "float32"
    )
    if logits.shape[-1] == 1:  # one entry takes all the weight (and Keras warns of the softmax)
        weights = ops.ones_like(logits)
    else:
        # Softmax in float32: under mixed precision the logits of many entries lose the
        # differences that decide the weights.
        weights = ops.softmax(logits * scale, axis=-1)
    lengths = [g.length for grid_groups in on_grid for g in grid_groups]
    w_all = ops.cast(weights, queries.dtype)
    split = (
        [w_all]
        if len(lengths) == 1
        else ops.split(w_all, list(itertools.accumulate(lengths))[:-1], axis=-1)
    )
    reads: dict[int, Any] = {}
    k = 0
    for r, grid_groups in zip(grids, on_grid, strict=True):
        factor = resolution // r
        spec = "bxyql,bxylw->bxyqw" if factor == 1 else "bxiyjql,bxylw->bxiyjqw"
        on_r: dict[int, Any] = {}
        for g in grid_groups:
            w = _on_grid(split[k], resolution, factor)
            part = ops.einsum(spec, w, ops.cast(g.values, w.dtype))
            width = int(g.values.shape[-1])
            on_r[width] = part if width not in on_r else on_r[width] + part
            k += 1
        for width, part in on_r.items():
            part = _off_grid(part, resolution, factor)  # (B, R, R, Q, width)
            reads[width] = part if width not in reads else reads[width] + part
    return reads, weights


def concatenate_entries(groups: Sequence[Entries]) -> Entries:
    """Groups on one grid as one group (the entries in order)."""
    if len(groups) == 1:
        return groups[0]
    return Entries(
        groups[0].resolution,
        ops.concatenate([g.keys for g in groups], axis=3),
        ops.concatenate([g.values for g in groups], axis=3),
    )


@dataclass(frozen=True)
class Memory:
    """What the decoder carries from block to block.

    ``encoder``: for each resolution that has top-down blocks, the encoder's entries as that
    grid reads them (None when sampling from the prior). ``finished``: the decoder's earlier
    entries, in groups of consecutive blocks at one resolution (one group per resolution once
    it is done). ``current``: the latest entries, not yet grouped, one per block. ``queries``:
    the queries of the block about to read, by chain.
    """

    encoder: dict[int, list[Entries]] | None
    finished: tuple[Entries, ...] = ()
    current: tuple[Entries, ...] = ()
    queries: dict[str, Any] = field(default_factory=dict)


class DepthwiseAttention(keras.layers.Layer):
    """Satisfies :class:`hvae_core.interfaces.Attention` (with ``prepare``)."""

    def __init__(
        self,
        model: Any,
        widths: Mapping[int, int],
        make_block: Any,
        query_width: int,
        num_queries: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(dtype=model.precision, **kwargs)
        self.query_width, self.num_queries = query_width, num_queries
        policy = self.dtype_policy
        layout = scales(model, sorted(widths, reverse=True))
        # Top-down order, as the decoder numbers its blocks: from the 1x1 scale up.
        self.block_scales = [s for s in reversed(layout) for _ in range(s.dec_blocks)]
        num_blocks = len(self.block_scales)
        resolutions = [s.resolution for s in self.block_scales]
        self.last_at_resolution = [
            i == num_blocks - 1 or resolutions[i + 1] != r for i, r in enumerate(resolutions)
        ]
        # After which blocks the latest entries become one group. Every group costs each later
        # read an operation or two, and every entry copied into a group costs memory: groups
        # of about sqrt(n) of the n blocks at a resolution keep both small (the operations of
        # a pass grow as n^1.5, not n^2; the memory as n). A finished resolution's groups
        # become one (a second copy, of a resolution below the largest).
        self.group_after = []
        for i, r in enumerate(resolutions):
            n = resolutions.count(r)
            position = i - resolutions.index(r) + 1
            self.group_after.append(position == n or position % math.ceil(math.sqrt(n)) == 0)
        # The first block's prior has no earlier block to read.
        self.chains = [(POSTERIOR,) if i == 0 else (PRIOR, POSTERIOR) for i in range(num_blocks)]
        self.read_resolutions = sorted(set(resolutions))
        # Reads are summed per value width; a 1x1 convolution maps them to the state's width
        # unless there is one query and one width to begin with.
        needs_combine = num_queries > 1 or len(set(widths.values())) > 1

        def conv(width: int, name: str) -> keras.layers.Conv2D:
            return keras.layers.Conv2D(
                width, 1, kernel_initializer=torch_default_init(), dtype=policy, name=name
            )

        self.encoder_keys = {f"r{r}": conv(query_width, f"enc_key_{r}") for r in widths}
        self.decoder_keys = [conv(query_width, f"key_{i}") for i in range(num_blocks - 1)]
        self.query_blocks = [
            make_block(
                in_width=s.width,
                middle_width=s.dec_middle_width,
                out_width=len(self.chains[i]) * num_queries * query_width,
                kernel_size=s.kernel_size,
                residual=False,
                last_scale=1.0,
                name=f"query_{i}",
            )
            for i, s in enumerate(self.block_scales)
        ]
        # Every gamma in one variable, (block, chain) with the chains in CHAINS order: one
        # variable instead of two per block keeps the optimizer's and the EMA's work (and the
        # compile) smaller. The first block's prior gamma is never read: it stays 0.
        self.gammas = self.add_weight(
            shape=(num_blocks, len(CHAINS)), initializer="zeros", name="gammas"
        )
        self.combines = {}
        if needs_combine:
            for i, s in enumerate(self.block_scales):
                for chain in self.chains[i]:
                    self.combines[f"{chain}_{i}"] = conv(s.width, f"combine_{chain}_{i}")
        # The sublayers build on the first forward pass; this layer has nothing else to build.
        self.built = True

    def gamma(self, block: int, chain: str) -> Any:
        """The trainable scale of block ``block``'s read for ``chain`` (starts at 0)."""
        return self.gammas[block, CHAINS.index(chain)]

    # -- the hook ------------------------------------------------------------------------------

    def encode(self, activations: Mapping[int, Any] | None) -> Memory:
        if activations is None:
            return Memory(encoder=None)
        entries = {
            r: Entries(
                r,
                ops.expand_dims(self.encoder_keys[f"r{r}"](a), 3),
                ops.expand_dims(a, 3),
            )
            for r, a in activations.items()
        }
        return Memory(
            encoder={read: self._encoder_view(entries, read) for read in self.read_resolutions}
        )

    @staticmethod
    def _encoder_view(entries: Mapping[int, Entries], resolution: int) -> list[Entries]:
        """The encoder's entries as the R x R grid reads them: coarser ones stay on their
        grids; finer ones go space-to-depth onto R x R, one group per value width."""
        coarser = [e for r, e in sorted(entries.items()) if r < resolution]
        finer: dict[int, list[Entries]] = {}
        for r, e in sorted(entries.items(), reverse=True):
            if r >= resolution:
                factor = r // resolution
                moved = Entries(
                    resolution,
                    space_to_depth(e.keys, factor),
                    space_to_depth(e.values, factor),
                )
                finer.setdefault(int(e.values.shape[-1]), []).append(moved)
        return coarser + [concatenate_entries(groups) for groups in finer.values()]

    def prepare(self, state: Any, memory: Memory, *, block: int, resolution: int) -> Memory:
        chains = self.chains[block]
        if memory.encoder is None and PRIOR not in chains:
            return dataclasses.replace(memory, queries={})  # sampling: nothing to read
        q = self.query_blocks[block](state)
        q = ops.reshape(
            q, (-1, resolution, resolution, len(chains) * self.num_queries, self.query_width)
        )
        n = self.num_queries
        queries = {chain: q[:, :, :, k * n : (k + 1) * n, :] for k, chain in enumerate(chains)}
        return dataclasses.replace(memory, queries=queries)

    def read(self, state: Any, memory: Memory, *, block: int, resolution: int, branch: str) -> Any:
        read, _ = self.read_with_weights(
            state, memory, block=block, resolution=resolution, branch=branch
        )
        return read

    def read_with_weights(
        self, state: Any, memory: Memory, *, block: int, resolution: int, branch: str
    ) -> tuple[Any, Any]:
        """:meth:`read`, and the attention weights (B, R, R, num_queries, entries), or None
        where there is nothing to read (the first block's prior)."""
        groups = self.visible(memory, resolution, branch)
        if not groups:
            return ops.zeros_like(state), None
        reads, weights = attend(memory.queries[branch], groups, resolution)
        parts = [
            ops.reshape(reads[w], (-1, resolution, resolution, self.num_queries * w))
            for w in sorted(reads)
        ]
        out = parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=-1)
        key = f"{branch}_{block}"
        if key in self.combines:
            out = self.combines[key](out)
        out = ops.cast(out, state.dtype)
        return ops.cast(self.gamma(block, branch), out.dtype) * out, weights

    @staticmethod
    def visible(memory: Memory, resolution: int, branch: str) -> list[Entries]:
        """The entries a read of ``branch`` at ``resolution`` attends over: the decoder's
        earlier blocks, and for the posterior also the encoder."""
        groups = [*memory.finished, *memory.current]
        if branch == POSTERIOR:
            if memory.encoder is None:
                raise ValueError("the posterior reads the encoder's entries; encode() got None")
            groups += memory.encoder[resolution]
        return groups

    def update(self, state: Any, memory: Memory, *, block: int, resolution: int) -> Memory:
        memory = dataclasses.replace(memory, queries={})
        if block == len(self.block_scales) - 1:
            return memory  # the last block's state is read by no one
        entry = Entries(
            resolution,
            ops.expand_dims(self.decoder_keys[block](state), 3),
            ops.expand_dims(state, 3),
        )
        current = (*memory.current, entry)
        if not self.group_after[block]:
            return dataclasses.replace(memory, current=current)
        finished = (*memory.finished, concatenate_entries(current))
        if self.last_at_resolution[block]:
            # Later blocks are all finer: one group per resolution keeps their reads short.
            done = [g for g in finished if g.resolution == resolution]
            finished = (
                *(g for g in finished if g.resolution != resolution),
                concatenate_entries(done),
            )
        return dataclasses.replace(memory, finished=finished, current=())


def make_depthwise_attention(
    options: Any, model: Any, *, widths: Mapping[int, int], make_block: Any
) -> DepthwiseAttention:
    """Factory of the ``depthwise`` attention plugin (:class:`hvae_core.interfaces.Attention`)."""
    return DepthwiseAttention(
        model,
        widths,
        make_block,
        query_width=options.query_width,
        num_queries=options.num_queries,
        name="depthwise_attention",
    )
