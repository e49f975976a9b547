"""``probe curves RUN_DIR``: representation metrics over training, one checkpoint at a time.

For every checkpoint of a run folder (``repdyn.model.checkpoint.list_checkpoints``):

* **student** probe accuracy: online weights (``ck["model"]``), block ``k_s``, time ``t``;
* **teacher** probe accuracy: EMA weights, block ``k_t``, the less noisy ``t_teacher``
  (SRA's teacher; the EMA is also what is sampled from);
* **similarity** on ``similarity_weights`` (EMA by default) at ``t``: the mean off-diagonal
  debiased CKA between blocks (pooled features), the debiased CKA between the student cell and the
  teacher cell (the pair SRA aligns), and DiverseDiT's three terms averaged over block pairs
  (token features of ``n_div`` images);
* **every block** at ``t`` on the same weights (``curves_blocks.csv``, tidy): alignment with an
  external encoder (CKNNA and mutual kNN of the pooled features of the ``n_test`` images against
  the encoder's, :func:`repdyn.analysis.alignment.align_cells`; the embedded encoder by default, as
  REPA's alignment-over-training figure) and the spatial structure of the patch tokens of the
  ``n_div`` images (LDS, CDS, RMSC, :func:`repdyn.analysis.spatial.spatial_cells`).

Defaults follow the run's SRA settings (``ck.config["sra"]``: student/teacher block, ``t_max``);
runs without SRA use :func:`repdyn.training.methods.sra.default_blocks`. ``t`` = 0.5 (SiT; DiT: step
T/2) and ``t_teacher = t - t_max / 2``, the mean teacher shift of SRA's uniform ``[0, t_max]`` draw.

Results are cached per checkpoint: ``curves.csv`` (probe rows), ``curves_similarity.csv`` and
``curves_blocks.csv`` carry ``checkpoint_sha`` and a ``settings_hash`` of every option that changes
the numbers, and a rerun computes only checkpoints whose (sha, settings) are missing; the block
measures have a hash of their own (:class:`BlockSettings`), so adding them to a run's curves never
recomputes its probes. Tables are rewritten atomically after
every checkpoint, so an interrupted run keeps what it finished; features also go through the
shared :class:`repdyn.probe.cache.FeatureCache`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from repdyn.analysis import plots
from repdyn.analysis.alignment import align_cells
from repdyn.analysis.diversity import diversity_report
from repdyn.analysis.spatial import SPATIAL_METRICS, spatial_cells
from repdyn.analysis.similarity import cka, cka_matrix
from repdyn.core.timesteps import format_t
from repdyn.probe.grid import validate_blocks
from repdyn.probe.layer_grid import check_probe_sizes, grid_table
from repdyn.probe.probes import PROBES
from repdyn.model.checkpoint import LoadedCheckpoint, checkpoint_from, list_checkpoints, load_checkpoint, run_dir_of
from repdyn.model.torch_file import file_sha, read_checkpoint
from repdyn.core.files import write_table
from repdyn.training.methods import SRAOptions
from repdyn.training.methods.sra import DEFAULT_T_MAX, default_blocks
from repdyn.core.runtime import resolve_device

from repdyn.model.encoders import Encoder, load_encoder, parse_encoder
from repdyn.commands.align import encoder_features, parse_metrics
from repdyn.commands.features import FeatureSpec, cell_t, data_of, dataset_for, load_features
from repdyn.commands.outputs import Outputs, claim_output, releases_outputs

__all__ = ["CurveSettings", "BlockSettings", "CurvesResult", "Cells", "resolve_cells", "run_curves", "PROBE_COLUMNS",
           "SIM_COLUMNS", "BLOCK_COLUMNS"]

PROBE_COLUMNS = ["run", "checkpoint", "checkpoint_sha", "step", "role", "weights", "block", "t", "log_snr",
                 "accuracy", "val_accuracy", "train_accuracy", "reg", "probe", "label_policy", "pooling", "dataset",
                 "n_train", "n_test", "seed", "model", "method", "protocol_hash", "settings_hash"]
SIM_COLUMNS = ["run", "checkpoint", "checkpoint_sha", "step", "weights", "t", "log_snr", "cka_mean_offdiag",
               "cka_student_teacher", "orthogonality", "token_cosine", "dispersion", "diversity", "n_blocks",
               "n_test", "n_div", "settings_hash"]
BLOCK_COLUMNS = ["run", "checkpoint", "checkpoint_sha", "step", "weights", "block", "t", "log_snr", "measure", "value",
                 "se", "reference", "n", "settings_hash"]


@dataclass
class CurvesResult(Outputs):
    computed: int = 0  # checkpoints computed in this call (the others came from the tables)
    checkpoints: int = 0
    student: tuple = ()  # (block, t)
    teacher: tuple = ()
    source: str = ""  # where the cells came from: flags, the run's SRA config or the defaults
    table: pd.DataFrame | None = None  # curves.csv rows of this run and settings
    similarity_table: pd.DataFrame | None = None
    blocks_table: pd.DataFrame | None = None  # curves_blocks.csv rows (alignment, spatial) of this run


@dataclass
class CurveSettings:
    """Every option that changes the numbers (hashed into ``settings_hash``)."""

    student_block: int
    teacher_block: int
    t: float | int
    t_teacher: float | int
    probe: str = "torch"
    n_train: int = 2000
    n_test: int = 1000
    n_div: int = 64
    similarity_weights: str = "ema"
    label: str = "null"
    pooling: str = "mean"
    seed: int = 0
    data: str | None = None

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass
class BlockSettings:
    """What changes the every-block measures (hashed apart from :class:`CurveSettings`)."""

    curve: str  # CurveSettings.hash(): the weights, t, images and seed they share
    encoder: dict | None  # the encoder's identity (its weights' hash included); None: no alignment
    align_metrics: tuple[str, ...] = ("cknna", "mutual_knn")
    topk: int = 10
    spatial: bool = True
    far_dist: int = 6
    dmax: int = 8

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True, default=str).encode()).hexdigest()[:12]

    @property
    def empty(self) -> bool:
        return self.encoder is None and not self.spatial


def _sra_options(ck: LoadedCheckpoint) -> SRAOptions | None:
    """The run's SRA options (config first, then checkpoint meta), None for a run without SRA."""
    method = str(ck.meta.get("method") or ck.config.get("method") or "")
    if "sra" not in method.split("+"):
        return None
    opts = dict(ck.config.get("sra") or {})
    opts.update({k: v for k, v in ((ck.meta.get("method_config") or {}).get("sra") or {}).items() if k not in opts})
    return SRAOptions.from_dict(opts, ck.model.config)


@dataclass(frozen=True)
class Cells:
    """The student and teacher cells a curves run follows, and where they came from."""

    student_block: int
    teacher_block: int
    t: float | int  # the student's time (SiT: float; DiT: DDPM step)
    t_teacher: float | int
    sra: bool  # whether the run trained with SRA (its config chose the blocks)
    t_max: float  # SRA's largest teacher time offset (the default for a run without SRA)
    source: str  # "flags", "SRA config" or "default_blocks (no SRA)"


def resolve_cells(ck, student_block: int | None = None, teacher_block: int | None = None, t: float | None = None,
                  t_teacher: float | None = None) -> Cells:
    """The student and teacher cells: flags first, then the run's SRA config, then the defaults."""
    sra = _sra_options(ck)
    depth = ck.model.depth
    ks_def, kt_def = (sra.student_block, sra.teacher_block) if sra else (
        default_blocks(ck.model.config) if depth >= 2 else (1, 1))
    ks = student_block if student_block is not None else ks_def
    kt = teacher_block if teacher_block is not None else kt_def
    validate_blocks([ks, kt], depth)
    t_max = sra.t_max if sra else DEFAULT_T_MAX
    fam, nt = ck.family, ck.num_timesteps
    if fam == "sit":
        t0 = cell_t(ck, 0.5 if t is None else t)
        tt = cell_t(ck, max(0.0, round(float(t0) - t_max / 2, 6)) if t_teacher is None else t_teacher)
    else:
        t0 = cell_t(ck, nt // 2 if t is None else t)
        tt = cell_t(ck, max(0, int(t0) - int(round(nt * t_max / 2))) if t_teacher is None else t_teacher)
    if (float(tt) > float(t0)):
        raise ValueError(f"--t-teacher {tt} is noisier than --t {t0}: SRA's teacher sees a less noisy input")
    flagged = student_block is not None or teacher_block is not None
    source = "flags" if flagged else ("SRA config" if sra is not None else "default_blocks (no SRA)")
    return Cells(ks, kt, t0, tt, sra=sra is not None, t_max=t_max, source=source)


def _read(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.exists():
        return pd.DataFrame(columns=columns)
    # keep_default_na=False: the label policy "null" must stay a string.
    return pd.read_csv(path, dtype={"checkpoint_sha": str, "settings_hash": str}, keep_default_na=False,
                       na_values=[""])


def _weight_sets(path: Path, spec: FeatureSpec, weights: set[str]) -> dict[str, LoadedCheckpoint]:
    """The checkpoint's ``weights`` sets (online, EMA) from one read of the file."""
    file = read_checkpoint(path, trust=spec.trust, map_location="cpu")
    return {w: checkpoint_from(file.obj, path, w, family=spec.family, time_convention=spec.time_convention,
                               num_heads=spec.num_heads, sha=file.sha) for w in weights}


def _one_checkpoint(cks: dict[str, LoadedCheckpoint], settings: CurveSettings, spec: FeatureSpec, run: str,
                    probe_device: str, dtr, dte) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Probe rows (student, teacher) and the similarity row of one checkpoint (``cks``: its online,
    EMA and similarity weights)."""
    s = settings
    ref = cks["ema"]
    path = ref.path
    k = max(dtr.num_classes, int(np.max(np.asarray(dtr.labels))) + 1)
    rows, test_feats = [], {}
    for role, w, b, t in (("student", "model", s.student_block, s.t), ("teacher", "ema", s.teacher_block, s.t_teacher)):
        _, gtr = load_features(cks[w], spec, blocks=[b], ts=[t], split="train", n=s.n_train, dataset=dtr)
        _, gte = load_features(cks[w], spec, blocks=[b], ts=[t], split="test", n=s.n_test, dataset=dte)
        df, _ = grid_table(gtr, gte, s.probe, device=probe_device, seed=s.seed, num_classes=k)
        df.insert(0, "role", role)
        rows.append(df)
        test_feats[role] = np.asarray(gte.features[(b, t)], dtype=np.float32)
    probe = pd.concat(rows, ignore_index=True)
    probe["run"], probe["settings_hash"] = run, s.hash()
    probe = probe[[c for c in PROBE_COLUMNS if c in probe.columns]]

    cks_sim = cks[s.similarity_weights]
    _, g = load_features(cks_sim, spec, blocks=None, ts=[s.t], split="test", n=s.n_test, dataset=dte)
    feats = [np.asarray(g.features[(b, s.t)], dtype=np.float32) for b in g.blocks]
    m = cka_matrix(feats, debiased=True)
    off = m[~np.eye(len(m), dtype=bool)]
    _, gt = load_features(cks_sim, spec, blocks=None, ts=[s.t], split="test", n=s.n_div, pooling="tokens", dataset=dte)
    rep = diversity_report({(b, s.t): gt.features[(b, s.t)] for b in gt.blocks}, gt.blocks, [s.t])
    sim = {"run": run, "checkpoint": str(path), "checkpoint_sha": ref.sha, "step": ref.step,
           "weights": s.similarity_weights, "t": s.t, "log_snr": g.log_snr[s.t],
           "cka_mean_offdiag": float(off.mean()) if off.size else np.nan,
           "cka_student_teacher": float(cka(test_feats["student"], test_feats["teacher"], debiased=True)),
           **{c: float(rep[c].mean()) for c in ("orthogonality", "token_cosine", "dispersion", "diversity")},
           "n_blocks": len(g.blocks), "n_test": s.n_test, "n_div": s.n_div, "settings_hash": s.hash()}
    return probe, pd.DataFrame([sim], columns=SIM_COLUMNS)


def _block_rows(ck: LoadedCheckpoint, settings: CurveSettings, blocks: BlockSettings, enc: Encoder | None,
                spec: FeatureSpec, run: str, dte) -> pd.DataFrame:
    """Alignment with the encoder and spatial structure of every block of one checkpoint at ``t``
    (the features come from the feature cache that the similarity measures filled)."""
    s, rows = settings, []
    keys = {"run": run, "checkpoint": str(ck.path), "checkpoint_sha": ck.sha, "step": ck.step, "weights": ck.weights}
    if enc is not None:
        _, g = load_features(ck, spec, blocks=None, ts=[s.t], split="test", n=s.n_test, dataset=dte)
        y = encoder_features(enc, dte, g.indices, FeatureSpec(**{**spec.__dict__, "split": "test"}), tokens=False,
                             dataset_name=str(g.meta.get("dataset")))
        wide = align_cells(y, {(b, s.t): g.features[(b, s.t)] for b in g.blocks}, metrics=blocks.align_metrics,
                           topk=blocks.topk, device=spec.device)
        for _, r in wide.iterrows():
            for m in blocks.align_metrics:
                rows.append({**keys, "block": int(r["block"]), "t": s.t, "log_snr": g.log_snr[s.t], "measure": m,
                             "value": float(r[m]), "se": np.nan, "reference": enc.name, "n": int(r["n"])})
    if blocks.spatial:
        _, gt = load_features(ck, spec, blocks=None, ts=[s.t], split="test", n=s.n_div, pooling="tokens", dataset=dte)
        sp = spatial_cells({(b, s.t): gt.features[(b, s.t)] for b in gt.blocks}, far_dist=blocks.far_dist,
                           dmax=blocks.dmax, device=resolve_device(spec.device))
        for _, r in sp.iterrows():
            rows.append({**keys, "block": int(r["block"]), "t": s.t, "log_snr": gt.log_snr[s.t], "measure": r["metric"],
                         "value": r["mean"], "se": r["se"], "reference": f"{r['grid']} grid", "n": int(r["n"])})
    out = pd.DataFrame(rows, columns=BLOCK_COLUMNS)
    out["settings_hash"] = blocks.hash()
    return out


def _block_settings(first: LoadedCheckpoint, settings: CurveSettings, encoder: str | None, align_metrics,
                    topk: int, spatial: bool, far_dist: int, dmax: int, spec: FeatureSpec,
                    notes: list[str]) -> tuple[BlockSettings, Encoder | None]:
    """The block measures this run can have: ``encoder`` "auto" is the embedded encoder for image
    data and none for latents (which it cannot read); spatial needs a grid that reaches the
    distance thresholds. What is left out is said in ``notes``."""
    data = data_of(first, spec)
    latent = first.meta.get("latent_scale") is not None
    if encoder == "auto":
        encoder = None if latent else "embedded"
        if latent:
            notes.append("curves: no encoder alignment for a latent model by default; pass --encoder (e.g. "
                         "features:PATH or dinov2-vitb14:PATH)")
    enc = None
    if encoder not in (None, "none"):
        parse_encoder(encoder)
        enc = load_encoder(encoder, data=data, device=resolve_device(spec.device), progress=spec.progress,
                           log=lambda m: notes.append(f"curves: {m}"))
    side = int(first.model.config.input_size // first.model.config.patch_size)
    if spatial and 2 * side - 2 < max(far_dist, dmax):
        notes.append(f"curves: no spatial measures: the {side}x{side} token grid has distances up to {2 * side - 2}, "
                     f"below --far-dist {far_dist} / --dmax {dmax}")
        spatial = False
    names = tuple(parse_metrics(align_metrics)) if enc is not None else ()
    return BlockSettings(settings.hash(), enc.identity() if enc is not None else None, names, int(topk), bool(spatial),
                         int(far_dist), int(dmax)), enc


@releases_outputs
def run_curves(run_dir: str | os.PathLike, spec: FeatureSpec, *, student_block: int | None = None,
               teacher_block: int | None = None, t: float | None = None, t_teacher: float | None = None,
               probe: str = "torch", n_train: int = 2000, n_test: int = 1000, n_div: int = 64,
               similarity_weights: str = "ema", probe_device: str | None = None, encoder: str | None = "auto",
               align_metrics: str | tuple = ("cknna", "mutual_knn"), topk: int = 10, spatial: bool = True,
               far_dist: int = 6, dmax: int = 8, out: str | os.PathLike | None = None,
               pdf: bool = False) -> CurvesResult:
    """Per-checkpoint student/teacher probe accuracy, CKA and diversity over training, and every
    block's alignment with ``encoder`` ("auto": the embedded one for image data; "none" skips it)
    and spatial structure (``spatial``; LDS ``far_dist``, CDS ``dmax``).

    Writes (into ``out``, default ``<run>/curves``) ``curves.csv``, ``curves_similarity.csv``,
    ``curves_blocks.csv``, ``curves.png`` (student vs teacher accuracy over steps),
    ``curves_similarity.png`` (CKA and diversity terms over steps) and ``curves_blocks.png`` (every
    block's alignment and spatial measures over steps).
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise ValueError(f"no checkpoints in {run_dir} (expected {run_dir}/checkpoints/NNNNNNN.pt)")
    if probe not in PROBES:
        raise ValueError(f"--probe must be one of {', '.join(PROBES)}, got {probe!r}")
    if similarity_weights not in ("ema", "model"):
        raise ValueError(f"--similarity-weights must be ema or model, got {similarity_weights!r}")
    if n_train < 10 or n_test < 4 or n_div < 2:
        raise ValueError("need --n-train >= 10, --n-test >= 4 (debiased CKA) and --n-div >= 2")
    first = load_checkpoint(ckpts[-1], weights="ema", family=spec.family, time_convention=spec.time_convention,
                            num_heads=spec.num_heads,
                            trust=spec.trust)
    cells = resolve_cells(first, student_block, teacher_block, t, t_teacher)
    ks, kt, t0, tt = cells.student_block, cells.teacher_block, cells.t, cells.t_teacher
    settings = CurveSettings(ks, kt, t0, tt, probe, n_train, n_test, n_div, similarity_weights, spec.label,
                             spec.pooling, spec.seed, spec.data)
    h = settings.hash()
    notes = list(first.load_notes())
    bset, enc = _block_settings(first, settings, encoder, align_metrics, topk, spatial, far_dist, dmax, spec, notes)
    bh = bset.hash()
    outdir = Path(out) if out is not None else run_dir / "curves"
    claim_output(outdir, {"command": "curves"})  # one writer; the tables hold every settings' rows by design
    pcsv, scsv, bcsv = outdir / "curves.csv", outdir / "curves_similarity.csv", outdir / "curves_blocks.csv"
    probe_df, sim_df, block_df = _read(pcsv, PROBE_COLUMNS), _read(scsv, SIM_COLUMNS), _read(bcsv, BLOCK_COLUMNS)
    done = set(probe_df.loc[probe_df["settings_hash"] == h, "checkpoint_sha"]) & set(
        sim_df.loc[sim_df["settings_hash"] == h, "checkpoint_sha"])
    done_blocks = set(block_df.loc[block_df["settings_hash"] == bh, "checkpoint_sha"]) if not bset.empty else None
    shas = {p: file_sha(p) for p in ckpts}
    todo = [p for p in ckpts if shas[p] not in done or (done_blocks is not None and shas[p] not in done_blocks)]
    pdev = probe_device or str(resolve_device(spec.device))
    run = run_dir_of(ckpts[0]).name
    if todo:  # loaded once for every checkpoint (the same images and noise for all of them)
        dtr, dte = dataset_for(first, spec, "train"), dataset_for(first, spec, "test")  # channels follow the model
        check_probe_sizes(n_train, len(dtr), dtr.num_classes)
    for p in tqdm(todo, desc=f"curves: {len(todo)} new of {len(ckpts)} checkpoints", disable=not spec.progress):
        probes_due = shas[p] not in done
        cks = _weight_sets(p, spec, {"model", "ema", similarity_weights} if probes_due else {similarity_weights})
        if probes_due:
            pr, sr = _one_checkpoint(cks, settings, spec, run, pdev, dtr, dte)
            probe_df = _replace_rows(probe_df, pr, shas[p], h)
            sim_df = _replace_rows(sim_df, sr, shas[p], h)
            write_table(probe_df.sort_values(["settings_hash", "step", "role"]), pcsv)
            write_table(sim_df.sort_values(["settings_hash", "step"]), scsv)
        if done_blocks is not None and shas[p] not in done_blocks:
            block_df = _replace_rows(block_df, _block_rows(cks[similarity_weights], settings, bset, enc, spec, run, dte),
                                     shas[p], bh)
            write_table(block_df.sort_values(["settings_hash", "step", "measure", "block"]), bcsv)

    cur = set(shas.values())
    pcur = probe_df[(probe_df["settings_hash"] == h) & probe_df["checkpoint_sha"].isin(cur)].sort_values("step").copy()
    scur = sim_df[(sim_df["settings_hash"] == h) & sim_df["checkpoint_sha"].isin(cur)].sort_values("step").copy()
    bcur = block_df[(block_df["settings_hash"] == bh) & block_df["checkpoint_sha"].isin(cur)].sort_values("step").copy()
    model = str(pcur["model"].iloc[0]) if len(pcur) else "?"
    meta = {"model": model,
            "protocol": f"{probe} probe, label={spec.label}, pooling={spec.pooling}, n_train={n_train}, "
                        f"n_test={n_test}", "blocks": cells.source}
    pcur["cell"] = [f"{r} ({'online' if w == 'model' else 'EMA'}, block {b}, t={format_t(cell_t(first, tv))})"
                    for r, w, b, tv in zip(pcur["role"], pcur["weights"], pcur["block"], pcur["t"])]
    pcur["accuracy (%)"] = 100 * pcur["accuracy"]
    res = CurvesResult(outdir, notes=notes, computed=len(todo), checkpoints=len(ckpts), student=(ks, t0), teacher=(kt, tt),
                       source=cells.source)
    res.save("png", plots.plot_curves(pcur, "step", "accuracy (%)", hue="cell",
                                      title=f"Linear-probe accuracy over training: student vs teacher ({run})",
                                      meta=meta, xlabel="training step", ylabel="top-1 accuracy (%)"), "curves.png", pdf)
    wword = "EMA" if similarity_weights == "ema" else "online"
    res.save("similarity_png", plots.plot_similarity_curves(
        scur, title=f"CKA and DiverseDiT terms over training ({run}, {wword} weights, t={format_t(t0)})",
        meta={"model": model, "protocol": f"debiased CKA on n={n_test} pooled test images; diversity terms on the "
                                          f"tokens of n={n_div} images, mean over block pairs"},
        st_label=f"block {ks} @ t={format_t(t0)} (online) vs block {kt} @ t={format_t(tt)} (EMA)"),
        "curves_similarity.png", pdf)
    if len(bcur):
        measures = [*bset.align_metrics, *(SPATIAL_METRICS if bset.spatial else ())]
        ref = f"alignment with {enc.name} (n={n_test} images, top-{topk})" if enc is not None else "no encoder"
        sp = f"spatial: tokens of n={n_div} images" if bset.spatial else "no spatial measures"
        res.save("blocks_png", plots.plot_measure_panels(
            bcur, measures, hue="block", title=f"Every block over training ({run}, {wword} weights, t={format_t(t0)})",
            meta={"model": model, "protocol": f"{ref}; {sp}; bands: +-1 SE over images"}, labels=plots.MEASURE_LABELS),
            "curves_blocks.png", pdf)
        res.files["blocks_csv"] = bcsv
    res.files["csv"], res.files["similarity_csv"] = pcsv, scsv
    res.table, res.similarity_table, res.blocks_table = pcur, scur, bcur
    return res.finish()


def _replace_rows(table: pd.DataFrame, new: pd.DataFrame, sha: str, settings_hash: str) -> pd.DataFrame:
    """``table`` with the rows of (checkpoint ``sha``, ``settings_hash``) replaced by ``new``."""
    if not len(table):
        return new
    keep = table[~((table["checkpoint_sha"] == sha) & (table["settings_hash"] == settings_hash))]
    return pd.concat([keep, new], ignore_index=True)
