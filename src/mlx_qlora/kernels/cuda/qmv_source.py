"""The CUDA source of the few-row 4-bit kernels (``qmv.py``): one ``Variant`` per kind of launch, its
body assembled from the sections of ``qmv.cu`` and from C code written here for the variant's matrices.

One kernel body serves every ``Variant``: one weight, up to three weights of one input with one output
each (q, k and v), gate and up with SwiGLU, and for the fused decoder layer an RMSNorm prologue, rotary
embeddings in the epilogue, the key/value cache written in place and a residual sum. ``Variant.source``
picks the CUDA-core body (``body``: optionally with its input rows staged in shared memory once per block,
``stage``) or the tensor-core body (``body_mma``); ``qmv_plan.py`` decides which a launch takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

from ... import settings
from . import l2_prefetch
from .sources import digest, sections

_CU = sections("qmv.cu")
HEADER = _CU["header"]
LOW_RANK_HEADER = _CU["low_rank_header"]  # added to the header of a variant with ``low_rank`` terms
THREADS = 256  # threads per block of the CUDA-core body (8 warps)


# Up to three weight matrices of one input (G of them, N0 + N1 + N2 rows in all); matrix g writes its own
# output y<g> (M, N<g>). The code names only the inputs that exist, so it is written out for each G.
# A matrix with rope set gets rotary embeddings in its epilogue: its output rows are heads of HD rows, and
# a warp reads rows (p, p + HD/2) of one head for R/2 consecutive p, the pairs that rotate together.
def _matrix_branches(n_matrices: int) -> list[str]:
    """C code choosing ``base``, ``local`` and ``g`` for the warp's first row ``n0``."""
    lines = ["  const unsigned int* base = w0;", "  int local = n0;", "  int g = 0;"]
    for g in range(1, n_matrices):
        first = " + ".join(f"N{i}" for i in range(g))
        lines += [f"  if (n0 >= {first}) {{", f"    base = w{g};", f"    local = n0 - ({first});", f"    g = {g};", "  }"]
    return lines


def _roped_expr(rope: tuple[bool, ...]) -> str:
    terms = [f"g == {g}" for g, on in enumerate(rope) if on]
    return " || ".join(terms) if terms else "false"


def select_split(n_matrices: int, rope: tuple[bool, ...] = (), mma: bool = False) -> str:
    """``row_ptr`` of the warp's rows: all R (the ``body`` section), or rows gid and gid + 8 of the block (``body_mma``)."""
    lines = _matrix_branches(n_matrices)
    lines += [f"  const bool roped = {_roped_expr(rope)};", "#pragma unroll"]
    if mma:
        lines += ["  for (int h = 0; h < 2; ++h) {", "    const int r = gid + 8 * h;"]
    else:
        lines += ["  for (int r = 0; r < R; ++r) {"]
    lines += ["    int row = local + r;"]
    if any(rope):
        lines += ["    if (roped) {",
                  "      row = (local / HD) * HD + (local % HD) / 2 + (r < R / 2 ? r : r - R / 2 + HD / 2);",
                  "    }"]
    lines += [f"    row_ptr[{'h' if mma else 'r'}] = reinterpret_cast<const uint4*>(base) + (size_t)row * CHUNKS;",
              "  }"]
    return "\n".join(lines)


def _rope_pair(indent: str) -> list[str]:
    """C lines naming lane r's rotary pair of a roped matrix: p (its index in the head's first half) and
    rows na = head start + p and nb = na + HD/2."""
    return [f"{indent}const int p = (local % HD) / 2 + r;", f"{indent}const int na = (local / HD) * HD + p;",
            f"{indent}const int nb = na + HD / 2;"]


def _addend(addend: tuple, g: int, index: str) -> str:
    """`` + F * add<g>[index]`` where matrix g has an addend of factor F (``Variant.addend``), else ``""``."""
    if g >= len(addend) or addend[g] is None:
        return ""
    return f" + {float(addend[g])!r}f * load_res(add{g}, {index})"


def _low_rank_value(v: "Variant", g: int, row: str) -> str:
    """``F * lr_scale[m] * (lb<g>[row] . lh[offset + m * cols + c:... + r])`` of matrix g's low-rank term
    (F, c, r) (``Variant.low_rank``; ``lr_scale`` only where the input is normed)."""
    factor, first, rank = v.low_rank[g]
    scale = " * lr_scale[m]" if v.norm_eps is not None else ""
    return (f"{float(factor)!r}f{scale} * low_rank_dot<{int(rank)}>(lb{g}, lh, (size_t)({row}), "
            f"(size_t){int(v.low_rank_offset)} + (size_t)m * {int(v.low_rank_cols)} + {int(first)})")


def _has_low_rank(v: "Variant", g: int) -> bool:
    return g < len(v.low_rank) and v.low_rank[g] is not None


def _terms(v: "Variant", g: int, index: str, row: str, lane_terms: bool = False) -> str:
    """What matrix g adds to its float32 sum at output ``index`` (row ``row``) before its epilogue: the
    addend and the low-rank term of ``Variant``, either, both or neither. ``lane_terms``: the low-rank term
    is the one ``lane_low_rank`` computed before the epilogue (``lr0[m]``, or ``lr1[m]`` for up's, or for
    the second row ``nb`` of a rotary pair), not computed here."""
    low_rank = ""
    if _has_low_rank(v, g):
        second = row == "nb" or (v.swiglu and g == 1)
        low_rank = f" + lr{int(second)}[m]" if lane_terms else " + " + _low_rank_value(v, g, row)
    return _addend(v.addend, g, index) + low_rank


def lane_low_rank(v: "Variant") -> str:
    """The CUDA-core body's low-rank terms of the rows lane r will write, computed by all lanes at once
    before the epilogue (which is unrolled over r with a compare, each copy run by one lane): ``lr0[m]``
    (gate's with SwiGLU; the row, or the pair's first row na with rotary embeddings) and ``lr1[m]`` (up's;
    the pair's second row nb). The same operations as in the epilogue, so the same numbers."""
    lines = ["  float lr0[M] = {}, lr1[M] = {};", "  {"]
    if v.norm_eps is not None:
        lines += ["    " + line.strip() for line in _CU["low_rank_scale"].strip("\n").splitlines()]
    lines += ["    const int r = lane;"]

    def fill(indent: str, pairs) -> list[str]:
        out = [f"{indent}#pragma unroll", f"{indent}for (int m = 0; m < M; ++m) {{"]
        out += [f"{indent}  lr{slot}[m] = {_low_rank_value(v, g, row)};" for slot, g, row in pairs]
        return out + [f"{indent}}}"]

    if v.swiglu:
        lines += ["    if (r < R) {", "      const int n = n0 + r;"]
        lines += fill("      ", [(g, g, "n") for g in (0, 1) if _has_low_rank(v, g)])
        lines += ["    }"]
    else:
        lines += ["    " + line.strip() for line in _matrix_branches(v.n_matrices)]
        lines += [f"    const bool roped = {_roped_expr(v.rope)};"]
        if any(v.rope):
            lines += ["    if (roped) {", "      if (r < R / 2) {",
                      *_rope_pair("        ")]
            for g, on in enumerate(v.rope):
                if on and _has_low_rank(v, g):
                    lines += [f"        if (g == {g}) {{"]
                    lines += fill("          ", [(0, g, "na"), (1, g, "nb")])
                    lines += ["        }"]
            lines += ["      }", "    } else if (r < R) {"]
        else:
            lines += ["    if (r < R) {"]
        lines += ["      const int local_n = local + r;"]
        for g in range(v.n_matrices):
            if _has_low_rank(v, g) and not (g < len(v.rope) and v.rope[g]):
                lines += [f"      if (g == {g}) {{"]
                lines += fill("        ", [(0, g, "local_n")])
                lines += ["      }"]
        lines += ["    }"]
    return "\n".join(lines + ["  }"])


def _store_kept(target: str, value: str) -> str:
    """``target = value`` rounded to T, the written value also kept in ``ev[m]`` for ``emit``."""
    return f"{{ const T yv = static_cast<T>({value}); {target} = yv; ev[m] = static_cast<float>(yv); }}"


def _store(g: int, n: str, value: str, cache: bool, emit: bool = False) -> str:
    """Write ``value`` to output row ``n`` (of sequence m) of matrix g; with ``cache``, matrices 1 and 2 (k
    and v) go to slot ``rope_pos[0] % C`` of the key/value cache instead, (M, N/HD, C, HD) in place. ``emit``:
    the value as written is also kept in ``ev[m]`` (``Variant.emit``)."""
    if emit:
        return _store_kept(f"y{g}[(size_t)m * N{g} + {n}]", value)
    if cache and g in (1, 2):
        buf = "kc" if g == 1 else "vc"
        return (f"const_cast<T*>({buf})[(((size_t)m * (N{g} / HD) + ({n}) / HD) * C + rope_pos[0] % C) * HD "
                f"+ ({n}) % HD] = static_cast<T>({value});")
    return f"y{g}[(size_t)m * N{g} + {n}] = static_cast<T>({value});"


def epilogue_split(n_matrices: int, rope: tuple[bool, ...] = (), residual: bool = False, cache: bool = False,
                   terms: Optional[Callable[[int, str, str], str]] = None, emit: bool = False) -> str:
    """Lane r's writes. Plain rows: row local + r of matrix g. Roped matrices: lanes r < R/2 write the pair
    (p, p + HD/2), p = (local % HD) / 2 + r, rotated by position ``rope_pos[0]``. ``cache``: see ``_store``.
    ``terms(g, index, row)``: what matrix g adds to its float32 sum at output ``index`` (row ``row``) before
    the rotation and the residual (``_terms``: LoRA addends and low-rank terms); nothing without it. ``emit``:
    see ``_store`` (one plain matrix only)."""
    terms = terms or (lambda g, index, row: "")
    lines = ["      " + line.strip() for line in _matrix_branches(n_matrices)]
    lines += [f"      const bool roped = {_roped_expr(rope)};"]
    if any(rope):
        lines += ["      if (roped) {", "        if (r < R / 2) {",
                  *_rope_pair("          "),
                  "          const float angle = (float)rope_pos[0] * ROPE_SCALE * exp2f(-(float)p * LOG2_BASE / (HD / 2));",
                  "          float sn, cs;",
                  "          sincosf(angle, &sn, &cs);"]
        for g, on in enumerate(rope):
            if not on:
                continue
            lines += [f"          if (g == {g}) {{",
                      f"            const float sa = static_cast<float>(s{g}[na]), ba = static_cast<float>(b{g}[na]);",
                      f"            const float sb = static_cast<float>(s{g}[nb]), bb = static_cast<float>(b{g}[nb]);",
                      "#pragma unroll", "            for (int m = 0; m < M; ++m) {",
                      "              const float va = sa * acc[r][m] + ba * xsum[m]"
                      + terms(g, f"(size_t)m * N{g} + na", "na") + ";",
                      "              const float vb = sb * acc[R / 2 + r][m] + bb * xsum[m]"
                      + terms(g, f"(size_t)m * N{g} + nb", "nb") + ";",
                      "              " + _store(g, "na", "va * cs - vb * sn", cache),
                      "              " + _store(g, "nb", "vb * cs + va * sn", cache),
                      "            }", "          }"]
        lines += ["        }", "      } else {"]
    else:
        lines += ["      {"]
    for g in range(n_matrices):
        res = f" + load_res(res, (size_t)m * N{g} + local_n)" if residual else ""
        lines += [f"        if (g == {g}) {{",
                  "          const int local_n = local + r;",
                  f"          const float s = static_cast<float>(s{g}[local_n]), b = static_cast<float>(b{g}[local_n]);",
                  "#pragma unroll", "          for (int m = 0; m < M; ++m) {",
                  "            " + _store(g, "local_n", "s * acc[r][m] + b * xsum[m]"
                                           + terms(g, f"(size_t)m * N{g} + local_n", "local_n") + res, cache,
                                    emit),
                  "          }", "        }"]
    lines += ["      }"]
    return "\n".join(lines)


# The CUDA-core body's input handling (``body``'s @STAGE@, @XLOAD@, @XSUM@, @XSUM_REDUCE@, @XSUM0@): each
# warp reads the input rows from L1/L2 and sums them itself.
_PER_WARP_INPUT = {
    "@STAGE@": "",
    "@XLOAD@": "load_x8<DT>(xb + (size_t)m * K * XBYTES, k, xv);",
    "@XSUM@": _CU["xsum"],
    "@XSUM_REDUCE@": "xsum[m] += __shfl_xor_sync(0xffffffffu, xsum[m], offset);",
    "@XSUM0@": "0.0f",
}


# The same with the input rows staged in shared memory through the RMSNorm's weight (the ``stage``
# section; only the RMSNorm launches stage their input).
_STAGED_INPUT = {
    "@STAGE@": _CU["stage"].replace("STAGE_WARPS", str(THREADS // 32)),
    "@XLOAD@": "load_staged<0>(xs4, (m * 4 + t) * SU * CHUNKS + j, CHUNKS, xv);",
    "@XSUM@": "",
    "@XSUM_REDUCE@": "",
    "@XSUM0@": "stage_sum[m]",
}


@dataclass(frozen=True)
class Variant:
    """What one kernel computes besides the matmuls: ``n_matrices`` weights with one output each, or gate
    and up with SwiGLU; optional RMSNorm of the input (``norm_eps``; input ``gamma``), rotary embeddings
    on some outputs (``rope`` per matrix; input ``rope_pos``), k and v written into a key/value cache in
    place (``cache``; inputs ``kc``, ``vc``), a residual added to the output (input ``res``), and blocks
    appended to the launch that ask L2 for ``prefetch`` further inputs (``l2_prefetch``).

    ``addend``: per matrix, None or a factor F: matrix g then has an input ``add<g>`` (M, N_g) (any dtype
    the kernel reads, float32 or bfloat16), and ``F * add<g>`` is added to its float32 sum before the
    epilogue (rotary embeddings, the cache write, SwiGLU, the residual): a LoRA update ``scale * (x @ A.T)
    @ B.T`` computed beside the launch, with F = scale. A variant without addends is the same source as
    before they existed.

    ``low_rank``: per matrix, None or (F, c, r): the variant then has an input ``lh`` (M,
    ``low_rank_cols``), the A-products of the adapted matrices side by side, and per adapted matrix g an
    input ``lb<g>`` (N_g, r), its B, and ``F * (lb<g>[n] . lh[m, c:c + r])`` is added to output n's sum
    where an addend would be: the update's second matmul done in the epilogue; its first, ``x @ A.T`` for
    every adapted matrix of the input at once, is written by an earlier launch (``emit_cols``) or is one
    small launch beside (``qmv.a_products``). With the RMSNorm the
    term is also multiplied by the kernel's 1/rms of the row: ``lh`` is then ``x @ (A * gamma).T`` of the
    raw input, and no normed copy of the input exists outside the kernel. ``low_rank_offset``: lh's rows
    start there (lh is then the layer's scratch, below).

    ``emit_cols``: the launch also writes the next launch's A-products of its outputs: for every row n it
    writes (value v, sequence m) it adds ``v * ea[n, j]`` to ``eh[emit_offset + m * emit_cols + j]`` with
    float atomics (inputs ``ea`` (N, emit_cols), the next launch's ``A.T``, and ``eh``, float32, changed in
    place); one matrix (a residual launch) or gate/up with SwiGLU. ``zero``: block 0 first zeroes that many
    floats of input ``zb`` (changed in place): the first launch of a decoder layer zeroes the layer's
    scratch that its later launches add to (``zero_scratch``, ``emit``)."""

    n_matrices: int = 1
    swiglu: bool = False
    norm_eps: Optional[float] = None
    rope: tuple[bool, ...] = ()
    rope_base: float = 10000.0
    rope_scale: float = 1.0
    residual: bool = False
    cache: bool = False
    prefetch: int = 0  # inputs pf0.. that appended blocks ask L2 for
    addend: tuple[Optional[float], ...] = ()  # per matrix: None or the factor of its addend input add<g>
    low_rank: tuple[Optional[tuple[float, int, int]], ...] = ()  # per matrix: None or (F, first column, rank)
    low_rank_cols: int = 0  # columns of ``lh``
    low_rank_offset: int = 0  # where ``lh``'s first row starts (in the layer's scratch)
    emit_cols: int = 0  # columns of the A-products written to ``eh`` (0: none)
    emit_offset: int = 0  # where they start in ``eh``
    zero: int = 0  # floats of ``zb`` that block 0 zeroes first (0: none)

    @property
    def input_names(self) -> list[str]:
        names = [f"{a}{g}" for g in range(self.n_matrices) for a in ("w", "s", "b")] + ["x"]
        names += ["gamma"] if self.norm_eps is not None else []
        names += ["rope_pos"] if any(self.rope) else []
        names += ["kc", "vc"] if self.cache else []
        names += ["res"] if self.residual else []
        names += [f"add{g}" for g, f in enumerate(self.addend) if f is not None]
        if self.has_low_rank:
            names += ["lh"] + [f"lb{g}" for g, t in enumerate(self.low_rank) if t is not None]
        names += ["ea", "eh"] if self.emit_cols else []
        names += ["zb"] if self.zero else []
        return names + [f"pf{i}" for i in range(self.prefetch)]

    @property
    def output_names(self) -> list[str]:
        if self.cache:
            return ["y0"]  # k and v go to the cache
        return ["y"] if self.swiglu else [f"y{g}" for g in range(self.n_matrices)]

    @property
    def has_addend(self) -> bool:
        return any(f is not None for f in self.addend)

    @property
    def has_low_rank(self) -> bool:
        return any(t is not None for t in self.low_rank)

    @property
    def name(self) -> str:
        kind = "swiglu" if self.swiglu else f"split{self.n_matrices}"
        extra = [] if self.norm_eps is None else ["norm"]
        extra += ["rope" + "".join(str(int(f)) for f in self.rope)] if any(self.rope) else []
        extra += ["res"] if self.residual else []
        extra += ["cache"] if self.cache else []
        extra += [f"pf{self.prefetch}"] if self.prefetch else []
        extra += ["add" + "".join("0" if f is None else "1" for f in self.addend)] if self.has_addend else []
        extra += ["lr" + "".join("0" if t is None else "1" for t in self.low_rank)] if self.has_low_rank else []
        extra += ["emit"] if self.emit_cols else []
        extra += ["zero"] if self.zero else []
        consts = digest(self.norm_eps, self.rope_base, self.rope_scale,
                        *((self.addend,) if self.has_addend else ()),
                        *((self.low_rank, self.low_rank_cols, self.low_rank_offset) if self.has_low_rank else ()),
                        *((self.emit_cols, self.emit_offset) if self.emit_cols else ()),
                        *((self.zero,) if self.zero else ())) if extra else "0"
        return "_".join(["mlx_qlora_qmv_per_row_4bit", kind, *extra, consts])

    def source(self, mma: bool = False, stage: bool = False, unroll: Optional[int] = None,
               mma_chunks: Optional[int] = None, mma_warps: Optional[int] = None) -> str:
        """The kernel body. ``mma``: the tensor-core body, one block per ``qmv_plan.MMA_ROWS`` rows, of
        ``mma_warps`` warps loading ``mma_chunks`` chunks per lane and iteration. ``stage``: the CUDA-core
        body with its input rows staged in shared memory (RMSNorm variants only; blocks of ``THREADS``);
        ``unroll``: its weight loop's unrolling. Unset numbers come from ``settings.current()``."""
        s = settings.current()
        unroll = s.qmv_unroll if unroll is None else unroll
        mma_chunks = s.qmv_mma_chunks if mma_chunks is None else mma_chunks
        mma_warps = s.qmv_mma_warps if mma_warps is None else mma_warps
        norm = self.norm_eps is not None
        if stage and (mma or not norm):
            raise ValueError("only the CUDA-core body of an RMSNorm variant stages its input")
        lane_terms = self.has_low_rank and not mma  # see lane_low_rank

        def terms(g: int, index: str, row: str) -> str:
            return _terms(self, g, index, row, lane_terms)

        emit = bool(self.emit_cols)
        if emit and not (self.swiglu or (self.n_matrices == 1 and not any(self.rope) and not self.cache)):
            raise ValueError("a launch emits A-products of one plain matrix's or of SwiGLU's outputs only")
        if self.swiglu:
            select = _CU["select_swiglu_mma"] if mma else _CU["select_swiglu"]
            epilogue = (_CU["epilogue_swiglu"].replace("@ADD_GATE@", terms(0, "(size_t)m * ROWS + n", "n"))
                        .replace("@ADD_UP@", terms(1, "(size_t)m * ROWS + n", "n")))
            if emit:
                target, value = "y[(size_t)m * ROWS + n]", "g / (1.0f + __expf(-g)) * u"
                store = f"{target} = static_cast<T>({value});"
                assert store in epilogue
                epilogue = epilogue.replace(store, _store_kept(target, value))
        else:
            select = select_split(self.n_matrices, self.rope, mma)
            epilogue = epilogue_split(self.n_matrices, self.rope, self.residual, self.cache, terms, emit)
        if self.has_low_rank and norm and mma:  # the terms' 1/rms of each input row, where the epilogue reads it
            epilogue = _CU["low_rank_scale_mma"] + "\n" + epilogue
        if mma:
            body = (_CU["body_mma"].replace("MMA_CHUNKS", str(mma_chunks)).replace("MMA_WARPS", str(mma_warps))
                    .replace("@SELECT@", select)
                    .replace("@EPILOGUE@", epilogue)
                    .replace("@XPREP@", _CU["mma_xprep_norm"] if norm else "")
                    .replace("@NORM@", _CU["mma_norm"] if norm else ""))
        else:
            body = _CU["body"]
            for key, code in (_STAGED_INPUT if stage else _PER_WARP_INPUT).items():
                body = body.replace(key, code)
            prologue = (_CU["norm_prologue_staged"] if stage else _CU["norm_prologue"]) if norm else ""
            body = (body.replace("@UNROLL@", str(unroll))
                    .replace("@SELECT@", select).replace("@EPILOGUE@", epilogue)
                    .replace("@LOW_RANK@", lane_low_rank(self) if lane_terms else "")
                    .replace("@PROLOGUE@", prologue)
                    .replace("@XSCALE@", _CU["norm_xscale"] if norm and not stage else "")
                    .replace("@POSTREDUCE@", _CU["norm_postreduce"] if norm else ""))
        if self.zero:
            body = _CU["zero_scratch"].replace("ZERO_FLOATS", str(int(self.zero))) + "\n" + body
        if emit:
            body = ("  float ev[M] = {};\n" + body + "\n"
                    + _CU["emit"].replace("EMIT_OFFSET", str(int(self.emit_offset)))
                    .replace("EMIT_COLS", str(int(self.emit_cols))))
        body = l2_prefetch.prefix(self.prefetch) + body
        if norm:
            body = body.replace("EPS", repr(float(self.norm_eps)) + "f")
        if any(self.rope):
            body = (body.replace("LOG2_BASE", repr(math.log2(self.rope_base)) + "f")
                    .replace("ROPE_SCALE", repr(float(self.rope_scale)) + "f"))
        return body
