"""Synthetic MOSI / MOSEI / IEMOCAP-shaped data where audio is partly predictable from vision + text.

Why: the research question (can a model that reconstructs audio A' from vision V and language L,
trained with a consistency loss against real audio, recover some of the benefit of audio when it
is missing at test time?) is only meaningful on data where (1) audio carries sentiment information,
(2) that information is *largely but not fully* recoverable from L and V, and (3) recovering it needs
a non-linear map of *both* L and V. This generator builds such data, in exactly the shapes and
conventions of the public MulT files (see ``mskt.data.presets`` and ``mskt.data.dataset``), so every part of
the pipeline can be tested and studied without downloading anything. ``probe`` measures (1)-(3)
with closed-form ridge regressions.

Generative process
------------------
Notation: i indexes samples, t time steps, K = ``latent_dim``, rho = ``latent_rho``,
p = ``audio_predictability``, N(0, 1) draws are independent unless said otherwise. "sd" is a
standard deviation. Every fixed map (W_*, C_*, M, A1, A2, b1, B) is drawn once per seed from its
own random stream ("the world"); samples are drawn from per-split, per-chunk streams. Only the
real (unpadded) steps are computed.

1. Affect (what the labels measure).
   Regression (mosi, mosei): latent sentiment
       s_i ~ (1-r)*0.53 N(-1.3, 0.8^2) + r N(0, 0.35^2) + (1-r)*0.47 N(+1.3, 0.8^2),  clipped to [-3, 3]
   with r = ``neutral_rate`` (a bimodal, slightly negative-heavy distribution with a neutral bump,
   like MOSI's). The label is an average of annotators' integer scores: with probability 0.7 five
   annotators (a multiple of 0.2), else three (a multiple of 1/3):
       y_i = clip(q_i * round((s_i + label_noise * N(0,1)) / q_i), -3, 3),  q_i in {0.2, 1/3}
   so labels are quantised and a few percent are exactly 0 (the non-zero and has-zero Acc2
   conventions then differ). The standardised affect a_i = (s_i - mean) / sd (n_a = 1 dim) drives
   the features.
   Emotions (iemocap): a_i ~ N(0, R) in 4 dims (neutral, happy, sad, angry), R with 1 on the
   diagonal and ``emotion_corr`` off it (emotions compete). Binary labels
       y_ik = 1[a_ik + label_noise * N(0,1) > tau_k],  tau_k = sqrt(1 + label_noise^2) * Phi^-1(1 - rate_k)
   with rate_k = ``emotion_rates`` (about 20-35% positive each, like IEMOCAP).

2. Each modality m expresses the affect with its own sample-level clarity:
       a_im = a_i + expr_noise_m * N(0, I)
   (how clearly this speaker's words / voice / face show the sentiment in this utterance). This is
   what bounds each modality's label R^2 and why combining modalities helps; defaults make text the
   clearest, then audio, then vision, as on real MOSI.

2b. Shared or private (``audio_shared`` = s, default 0). Audio's view can share its noise with
   what text and vision jointly show: with a_iLV = (a_iL / sd_L^2 + a_iV / sd_V^2) / (1 / sd_L^2 + 1 / sd_V^2)
   (the best estimate of a_i from both views; its noise variance is sd_LV^2 = 1 / (1/sd_L^2 + 1/sd_V^2))
       a_iA = a_i + sqrt(1 - s) * (a_iA,own - a_i) + sqrt(s) * (a_iLV + sqrt(sd_A^2 - sd_LV^2) N(0, 1) - a_i)
   (sd_m = expr_noise_m; a_iA,own is step 2's view). At s = 0 audio's view is its own (independent of
   L's and V's: audio knows things about the label that L + V cannot). At s = 1 it is L + V's view
   plus label-free noise, so everything it knows about the label L + V know too (all of audio's
   label information is shared, reachable from L and V). In between, part of each. The noise
   variance stays sd_A^2 (if sd_A >= sd_LV; else it is sd_LV^2 at s = 1), so audio's own label R^2
   stays the same while s moves it from private to shared. The extra N(0, 1) has its own stream.

3. A latent state z_it in R^K per word step t = 1..T0 (T0 = the preset's aligned length), an AR(1)
   process with unit stationary variance whose mean is shifted by the affect:
       u_i1 ~ N(0, I),  u_it = rho * u_i,t-1 + sqrt(1 - rho^2) * N(0, I)
       z_it = u_it + latent_shift * a_i M          (M: n_a x K, random signs / sqrt(K))

4. Durations. u_i ~ Beta(length_beta), frac_i = f_min + (1 - f_min) * u_i, with f_min =
   ``aligned_min_frac`` or ``unaligned_min_frac``. Modality m with T_m steps has true length
   L_im = clip(round(frac_i * T_m), 1, T_m): the same fraction of the full length for all modalities
   of a sample. The sample's trajectory is the last L_i0 word steps of z_i; modality m sees it
   linearly interpolated to L_im evenly spaced points over the same span (identity when aligned).
   Features are written into the last L_im steps; the steps before are exactly 0 (left padding).

5. Text and vision each see a different part of z (partial views): text the first
   k = ceil(view_frac * K) coordinates, vision the last k (they overlap in the middle only), through
   fixed random linear maps, plus a direct affect cue and white noise:
       text_it   = z_it[:k]  W_L + cue_text   * a_iL C_L + noise_text   * N(0, I_300)
       vision_it = z_it[-k:] W_V + cue_vision * a_iV C_V + noise_vision * N(0, I_Dv)
   W_L (k x D_L) and W_V with N(0, 1/k) entries (unit variance per feature from z), C_* (n_a x D)
   Gaussian, rescaled to a mean square of exactly 1 per feature (so a cue's strength does not
   depend on the seed). So z as a whole is recoverable only by combining L and V; the affect cue is
   strong in text (300 features), weak in vision.

6. Audio is a fixed non-linear function of the whole latent state plus a direct cue of audio's own
   affect view, mixed with an audio-private AR process (speaker, channel, prosody unrelated to the
   content) and noise:
       g_it     = standardise(tanh(audio_gain * z_it A1 + b1) A2)                    (H = audio_hidden units)
       f_it     = (g_it + cue_audio * a_iA C_A) / sqrt(1 + cue_audio^2 * (1 + expr_noise_audio^2))
       e_it     : AR(1) in ``private_dim`` dims with unit variance, coefficient private_rho per word step
       priv_it  = e_it B                                                              (B: unit-norm columns)
       audio_it = sqrt(p) * f_it + sqrt(1 - p) * priv_it + noise_audio * N(0, I_Da)
   A1: Gaussian columns scaled to unit norm; b1: the H evenly spaced quantiles of N(0, audio_bias^2)
   in random order (off-centre units bend asymmetrically, so g has even, energy-like components no
   linear map of z has); A2 ~ N(0, 1/H). "standardise" uses constants
   fixed per seed (mean and sd of g over 8192 draws of z from its stationary prior), so g, f and
   priv features have mean ~0 and variance ~1, and p is the share of audio's signal variance that
   is content (z and affect) rather than private. In unaligned data each modality has its own
   frame rate: the private AR coefficient per frame is private_rho ** (T0 / T_m), so its
   correlation time in real time does not depend on the frame rate; noise is white per frame.
   Then a fraction ``audio_neg_inf_rate`` of the real audio values is set to -inf, as in the
   COVAREP log features of the public files, and (unless ``replace_nonfinite=False``)
   ``mskt.data.dataset.replace_nonfinite`` sets them to 0 and records the counts in ``meta.nonfinite``.

So audio is largely (fraction ~p of its signal variance) a function of what L and V jointly see, not
fully (the private part, the noise, and audio's own affect view), and the function is non-linear
(tanh), so a linear map from [L, V] recovers less of it than a non-linear one. Audio's affect view
is independent of text's and vision's (with the default ``audio_shared`` = 0), so audio adds label
information to L + V.

Determinism: the same (preset, aligned, scale, seed, knobs) gives bit-identical arrays, independent
of any global random state (numpy ``default_rng`` streams keyed by seed, split and chunk). The
world maps depend on the seed, the preset's dims and the knobs; the labels, affect views, length
fractions and z trajectories depend on (seed, split, scale) and the knobs that shape them, not on
``aligned``: the aligned and unaligned versions of a preset with the same seed
and scale have identical labels and latent trajectories (as the two public MulT files hold the same
segments); only the observation noise and the minimum length differ.

Defaults (``SyntheticConfig``) were tuned so that, on mosi aligned at scale 1 and seeds 0..2,
``probe`` gives label R^2 text > audio > vision, text+vision+audio > text+vision, and per-step
audio-from-[L, V] R^2 between 0.4 and 0.8, higher with a non-linear feature map than linearly
(the numbers are in the docstring of ``probe``).

The premise as knobs
--------------------
Knowledge transfer from a train-only audio is learning with privileged information: its benefit
should depend on how much of audio's label information L and V can reach, and on how hard the map
from L + V to audio is. Two knobs set these, each with everything else fixed:

- ``audio_shared`` (s, step 2b): how much of audio's label information is shared with L + V rather
  than private to audio. 0 (the default): audio's view of the affect is its own.
- ``audio_gain`` (with ``audio_bias``, step 6): how non-linear audio's content g(z) is: near 0 g is
  almost linear in z; 1.5 (the default) saturates tanh. (``audio_predictability`` sets how much of
  audio is content at all.)

``probe`` on mosi aligned, scale 1, seeds 0..2 (ranges over the seeds; label R^2 from L+V: 0.499-0.565
for every row, as the knobs touch audio only). "private" = label R^2(L+V+A) - label R^2(L+V): label
information only audio holds; "gap" = per-step audio R^2 non-linear - linear:

    knobs                        label R^2 A   L+V+A         private       audio linear  non-linear    gap
    defaults (s = 0, gain 1.5)   0.319-0.379   0.549-0.608   0.043-0.053   0.517-0.540   0.614-0.623   0.083-0.097
    audio_shared = 0.5           0.319-0.390   0.510-0.571   0.006-0.011   0.569-0.598   0.668-0.684   0.085-0.099
    audio_shared = 1             0.326-0.389   0.501-0.566   0.001-0.002   0.598-0.632   0.698-0.720   0.087-0.100
    audio_gain = 0.5             0.313-0.380   0.547-0.607   0.042-0.051   0.611-0.644   0.659-0.673   0.029-0.050
    audio_gain = 3               0.334-0.381   0.550-0.610   0.045-0.056   0.489-0.495   0.566-0.571   0.076-0.081
    audio_shared = 1, gain 3     0.348-0.390   0.501-0.566   0.001-0.002   0.572-0.582   0.655-0.664   0.080-0.083

So s moves audio's label information from private to shared while audio's own label R^2 stays
(0.32-0.39): at s = 0.5 most of the private part is already gone (it falls like (1 - sqrt(s))^2, as
the private share of the view's *noise* is 1 - s), at s = 1 none is left. Audio also becomes more
predictable per step as s grows (its affect cue becomes a function of L + V). ``audio_gain`` leaves
the label information alone and changes how linear the map from L + V to audio is (gap 0.03-0.05
at 0.5, ~0.09 at 1.5). Measured with ``probe(make_synthetic("mosi", seed=s, **knobs))``.

Controls (``control``) and test sets of any size
------------------------------------------------
In the worlds above, what reconstructing audio could teach is already linear in L + V, so a method
that reconstructs audio ("kt") failing to beat "language_vision" could mean the method cannot help or
that the testbed could never show it. Two control worlds tell the two apart
(``synthetic:<preset>?control=positive`` / ``control=negative``; ``mskt.experiments.controls``
trains them):

- ``control=negative`` is exactly the default world (bit-identical arrays to ``control=none``; it
  refuses ``audio_shared`` > 0): audio's extra label information is its own affect view, independent
  of L's and V's, so no reconstruction from L + V can carry it. Knowledge transfer should not help.
- ``control=positive`` (learning using privileged information where it must help). The affect a_i
  (step 1, same labels as the other worlds) sets a within-sample correlation
      rho_i = tanh(a_i . u)            (u = 1 for regression; (1, 1, 1, 1) / 2 for iemocap)
  between latent coordinates 0 and 1 (seen by text only) and between K-2 and K-1 (seen by vision
  only): z_i1 = rho_i z_i0 + sqrt(1 - rho_i^2) z_i1 per step, the same for (K-2, K-1), so every
  coordinate stays a unit-variance AR(1) and z gets no affect shift (step 3's latent_shift is not
  used). Text and vision see z through block maps (each feature one coordinate of its view, so no
  feature's mean or variance moves with rho) plus their white noise, and have no affect cue. Audio
  shows the products linearly: content h_it = (z_i0 z_i1 + z_i,K-2 z_i,K-1) / (2 * 0.9) (variance ~1.4)
  times one fixed direction C_A (unit mean square), then audio_it = sqrt(p) h_it C_A + sqrt(1 - p) priv_it + noise as in step 6.
  So the label reaches L and V only through a second-order, entangled map (a correlation between
  coordinates, invisible to each feature's own statistics) that is slow to learn from few labels,
  while audio exposes it linearly, and a per-step reconstruction of audio from L and V (learnable
  from every sample, labelled or not) exposes it too. Needs latent_dim - ceil(view_frac * latent_dim) >= 2.

``control_probes`` (``probe`` plus a quadratic L + V probe and A^, a closed-form non-linear
reconstruction of audio from L and V fit without labels; see its docstring), mosi aligned, scale 1,
seeds 0..2. Label R^2 from L+V linear, from A linear, from L+V quadratic, from pooled A^ alone and
beside L+V; per-step audio R^2 from L+V linear / non-linear:

    control    L+V lin       A lin         L+V+A         L+V quad      A^            L+V+A^        audio lin     audio nonlin
    negative   0.499-0.565   0.319-0.379   0.549-0.608   0.501-0.570   0.279-0.368   0.500-0.567   0.517-0.540   0.614-0.623
    positive   -0.002-0.000  0.652-0.679   0.568-0.625   0.629-0.652   0.660-0.681   0.592-0.636   -0.003-0.000  0.625-0.726

Negative: A^ adds 0.001-0.002 to L + V (all that reconstruction can reach is already linear in
L + V), though real audio adds ~0.05 (private). Positive: L + V read linearly give nothing, audio
read linearly 0.65-0.68, and A^ from L + V alone as much, with no label used to build it.

``test_size`` and ``valid_size`` set those splits' sizes independently of ``scale`` (0: the
preset's size times ``scale``). Every split draws from its own streams (keyed by seed and split), so
the same seed gives the same train (and valid) split whatever the test size: a larger test set
narrows test-metric noise without changing training (``synthetic:mosi?test_size=2000``).

Emotions (iemocap) labels are four independent 0/1 columns: an utterance may have none or several
emotions (about a quarter have none with the default rates).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from statistics import NormalDist

import numpy as np

from mskt.data.dataset import DatasetMeta, MultimodalDataset, Split, replace_nonfinite, validate
from mskt.errors import ConfigError
from mskt.data.presets import EMOTIONS, MODALITIES, SPLITS, data_shape

__all__ = ["CONTROLS", "SyntheticConfig", "control_probes", "knob_names", "make_synthetic", "parse_knobs", "probe", "pooled_features", "ridge_r2"]

_CHUNK = 256  # samples generated at a time: bounds temporaries (MOSEI unaligned audio: ~40 MB)
_CALIB = 8192  # prior draws used to standardise the audio map f
CONTROLS = ("none", "negative", "positive")


@dataclass
class SyntheticConfig:
    """The generator's knobs. Names match the symbols of the module docstring; each field's
    docstring says what it does and why its default. Pass them to ``make_synthetic`` as keywords.
    """

    latent_dim: int = 8
    """K, dimensions of the latent state z. 8 with ``view_frac`` 0.625 gives text and vision 5
    coordinates each, 2 of them shared: 3 coordinates only text sees, 3 only vision sees."""
    latent_rho: float = 0.8
    """AR(1) coefficient of z per word step: smooth (correlation time ~5 words) yet varied enough
    within an utterance that per-step reconstruction of audio is a real task."""
    latent_shift: float = 0.3
    """How far the mean of z moves per standardised unit of affect. Small, so that most of each
    modality's sentiment information comes from its own, independent, affect view, and so that
    combining modalities helps."""
    view_frac: float = 0.625
    """Fraction of z's coordinates text sees (the first ones) and vision sees (the last ones)."""
    cue_text: float = 0.3
    """Per-feature sd of text's direct affect cue (times a_iL). Summed over 300 features it stands
    far above the noise, so text's label information is limited by ``expr_noise_text`` alone."""
    cue_audio: float = 0.3
    """Weight of audio's direct affect cue next to g (unit variance per feature). Larger makes audio
    more informative about the label but less predictable per step from L and V (the cue is audio's
    own affect view); 0.3 keeps the per-step audio-from-[L, V] R^2 in 0.4-0.6."""
    cue_vision: float = 0.4
    """Per-feature sd of vision's direct affect cue: weak next to z's contribution and the noise."""
    expr_noise_text: float = 1.0
    """sd (standardised affect units) of text's sample-level view of the affect: the clearest view,
    giving a label R^2 of ~0.5 from text alone (real MOSI text-only models reach correlations ~0.6-0.7)."""
    expr_noise_audio: float = 1.2
    """sd of audio's view of the affect: less clear than text's, clearer than vision's (label R^2 ~0.35)."""
    expr_noise_vision: float = 2.5
    """sd of vision's view of the affect: the least clear (faces are often neutral; label R^2 ~0.2)."""
    noise_text: float = 2.0
    """sd of white noise per text feature and step, against unit variance from z: most GloVe
    variance is lexical, not affective. Spread over 300 features, z stays recoverable from text."""
    noise_audio: float = 0.2
    """sd of white noise per audio feature and step (on top of the unit-variance signal parts)."""
    noise_vision: float = 0.7
    """sd of white noise per vision feature and step: 20-35 Facet features see z only moderately well,
    which caps how well the vision-only coordinates of z (and so audio) can be recovered."""
    audio_predictability: float = 0.9
    """p: share of audio's signal variance that is content (g(z) and the affect cue) rather than
    private. With the private part, noise, audio's own affect view and the imperfect recovery of z
    from noisy L and V, 0.9 leaves audio largely (R^2 ~0.55 non-linearly) but not fully predictable."""
    audio_shared: float = 0.0
    """s: share of the noise of audio's affect view that is the noise of what text and vision jointly
    show of the affect, rather than audio's own (step 2b of the module docstring). It moves audio's
    label information from private (s = 0: audio's view is independent of text's and vision's, so
    audio tells the label things L + V cannot) to shared (s = 1: everything audio's view knows about
    the label, L + V know too) while the amount stays fixed (the view's noise variance stays
    ``expr_noise_audio``^2 as long as that is >= the noise variance of L + V's combined view). The
    premise knob of "when does knowledge transfer help"; 0 keeps the generator as it was."""
    audio_hidden: int = 64
    """H, hidden units of the fixed random tanh map g: enough units that g's character (and the
    probe numbers) vary little from seed to seed."""
    audio_gain: float = 1.5
    """Pre-activation scale of g: larger saturates tanh more (more non-linear). 1.5 with
    ``audio_bias`` 2 makes a linear map from [L, V] recover ~0.1 R^2 less than a non-linear one
    while g stays smooth and learnable."""
    audio_bias: float = 2.0
    """sd of the hidden biases b1 of g: off-centre tanh units bend asymmetrically, so g has even
    (energy-like) components that no linear map of z represents."""
    private_dim: int = 4
    """Dimensions of audio's private AR process (projected to all audio features)."""
    private_rho: float = 0.8
    """AR(1) coefficient of audio's private process per word step (rescaled per frame when unaligned)."""
    label_noise: float = 0.3
    """sd of annotator disagreement added to s (regression, label units) or to a_k (emotions)."""
    neutral_rate: float = 0.1
    """Weight of the neutral bump of the sentiment prior (regression): ~5% of labels exactly 0."""
    emotion_rates: tuple = (0.30, 0.25, 0.22, 0.23)
    """Base rates of neutral, happy, sad, angry (iemocap), about as in IEMOCAP."""
    emotion_corr: float = -0.2
    """Correlation between the 4 latent emotion scores (negative: emotions compete). Must be > -1/3."""
    aligned_min_frac: float = 0.1
    """Shortest true length in aligned data as a fraction of the full length (5 of 50 words: MOSI
    has very short utterances); lengths are skewed short by ``length_beta``."""
    unaligned_min_frac: float = 0.2
    """Shortest true length in unaligned data, as a fraction of each modality's full length."""
    length_beta: tuple = (1.5, 2.5)
    """Beta(a, b) shape of the length fraction above its minimum (mean 0.375): aligned MOSI samples
    are ~22 of 50 steps long on average, so most sequences carry padding, as in the real files."""
    audio_neg_inf_rate: float = 2e-4
    """Fraction of real audio values set to -inf (COVAREP log features): small but nonzero, so the
    non-finite replacement path is exercised (tens of values for MOSI)."""
    replace_nonfinite: bool = True
    """Replace the -inf values by 0 (as the public MulT code does) and record the counts in
    ``meta.nonfinite``. False keeps them, to test code that must cope with raw files."""
    control: str = "none"
    """A control world for testing whether knowledge transfer can show an effect at all (see
    "Controls" in the module docstring): "none" (the generator as described above), "negative"
    (exactly the same data as "none": audio's extra label information is private, so a
    reconstruction A' from L + V cannot carry it; refuses ``audio_shared`` > 0) or "positive" (the
    label reaches L and V only through an entangled, second-order map that audio shows linearly)."""
    test_size: int = 0
    """Samples in the test split; 0: the preset's test size times ``scale``. The train and valid
    splits are drawn from their own streams, so a different test size never changes them."""
    valid_size: int = 0
    """Samples in the valid split; 0: the preset's valid size times ``scale`` (train and test unchanged)."""

    def __post_init__(self):
        self.emotion_rates = tuple(float(v) for v in self.emotion_rates)
        self.length_beta = tuple(float(v) for v in self.length_beta)
        self.check()

    def check(self) -> None:
        """Raise ConfigError for a value out of range (every message names the knob)."""

        def need(ok, name, what):
            if not ok:
                raise ConfigError(f"synthetic knob {name}={getattr(self, name)!r}: expected {what}")

        def num(name):
            v = getattr(self, name)
            return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("latent_dim", "audio_hidden", "private_dim"):
            v = getattr(self, name)
            need(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1, name, "an integer >= 1")
        need(self.latent_dim >= 2, "latent_dim", "an integer >= 2")
        for name in ("latent_rho", "private_rho"):
            need(num(name) and 0 <= getattr(self, name) < 1, name, "a number in [0, 1)")
        for name in (
            "latent_shift", "cue_text", "cue_audio", "cue_vision", "expr_noise_text", "expr_noise_audio",
            "expr_noise_vision", "noise_text", "noise_audio", "noise_vision", "audio_gain", "audio_bias", "label_noise",
        ):
            need(num(name) and getattr(self, name) >= 0, name, "a number >= 0")
        need(num("audio_predictability") and 0 <= self.audio_predictability <= 1, "audio_predictability", "a number in [0, 1]")
        need(num("audio_shared") and 0 <= self.audio_shared <= 1, "audio_shared", "a number in [0, 1]")
        need(num("view_frac") and 0 < self.view_frac <= 1, "view_frac", "a number in (0, 1]")
        need(num("neutral_rate") and 0 <= self.neutral_rate <= 1, "neutral_rate", "a number in [0, 1]")
        need(num("emotion_corr") and -1 / 3 < self.emotion_corr < 1, "emotion_corr", "a number in (-1/3, 1)")
        for name in ("aligned_min_frac", "unaligned_min_frac"):
            need(num(name) and 0 < getattr(self, name) <= 1, name, "a number in (0, 1]")
        need(num("audio_neg_inf_rate") and 0 <= self.audio_neg_inf_rate <= 0.1, "audio_neg_inf_rate", "a number in [0, 0.1]")
        need(
            len(self.emotion_rates) == len(EMOTIONS) and all(0 < v < 1 and math.isfinite(v) for v in self.emotion_rates),
            "emotion_rates",
            f"{len(EMOTIONS)} numbers in (0, 1) (order {', '.join(EMOTIONS)})",
        )
        need(len(self.length_beta) == 2 and all(v > 0 and math.isfinite(v) for v in self.length_beta), "length_beta", "two numbers > 0")
        need(isinstance(self.replace_nonfinite, (bool, np.bool_)), "replace_nonfinite", "True or False")
        need(self.control in CONTROLS, "control", f"one of {', '.join(CONTROLS)}")
        need(not (self.control == "negative" and self.audio_shared > 0), "control",
             "audio_shared = 0 with control=negative (its audio is private by definition)")
        for name in ("test_size", "valid_size"):
            v = getattr(self, name)
            need(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and (v == 0 or 8 <= v <= 1_000_000), name,
                 "0 (the preset's size times scale) or an integer in [8, 1000000]")

    def to_dict(self) -> dict:
        """JSON-able dict of every knob (tuples as lists)."""
        d = asdict(self)
        d["emotion_rates"] = list(self.emotion_rates)
        d["length_beta"] = list(self.length_beta)
        d["replace_nonfinite"] = bool(self.replace_nonfinite)
        return json.loads(json.dumps(d))


def knob_names() -> list:
    return [f.name for f in fields(SyntheticConfig)]


# ----------------------------------------------------------------------------------------------
# Generator


_MIX_W = (0.53, 0.47)  # negative / positive share of the non-neutral sentiment components
_MIX_MU, _MIX_SD, _NEU_SD = 1.3, 0.8, 0.35


def _sentiment_moments(r: float) -> tuple:
    wn, wp = (1 - r) * _MIX_W[0], (1 - r) * _MIX_W[1]
    mean = (wp - wn) * _MIX_MU
    m2 = (1 - r) * (_MIX_MU**2 + _MIX_SD**2) + r * _NEU_SD**2
    return mean, math.sqrt(m2 - mean**2)


class _World:
    """The fixed random maps of one seed and preset (step 3, 5 and 6 of the module docstring)."""

    def __init__(self, cfg: SyntheticConfig, dims: dict, n_a: int, seed: int):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
        K, H, P = cfg.latent_dim, cfg.audio_hidden, cfg.private_dim
        self.k = k = max(1, math.ceil(cfg.view_frac * K))
        # random signs of equal size: the affect shifts every coordinate of z equally, so text's and
        # vision's views of z carry equal shares of it whatever the seed
        self.M = (rng.choice([-1.0, 1.0], size=(n_a, K)) / math.sqrt(K)).astype(np.float32)
        self.W = {
            "text": (rng.standard_normal((k, dims["text"])) / math.sqrt(k)).astype(np.float32),
            "vision": (rng.standard_normal((k, dims["vision"])) / math.sqrt(k)).astype(np.float32),
        }
        self.C = {
            "text": (rng.standard_normal((n_a, dims["text"])) / math.sqrt(n_a)).astype(np.float32),
            "vision": (rng.standard_normal((n_a, dims["vision"])) / math.sqrt(n_a)).astype(np.float32),
        }
        # unit-norm input weights (every hidden unit sees z with the same variance) and biases at
        # evenly spaced quantiles of N(0, audio_bias^2), shuffled: g's degree of non-linearity
        # then varies little from seed to seed
        A1 = rng.standard_normal((K, H))
        self.A1z = (A1 / np.linalg.norm(A1, axis=0, keepdims=True)).astype(np.float32)
        q = [NormalDist().inv_cdf((h + 0.5) / H) for h in range(H)]
        self.b1 = (cfg.audio_bias * rng.permutation(np.array(q))).astype(np.float32)
        self.A2 = (rng.standard_normal((H, dims["audio"])) / math.sqrt(H)).astype(np.float32)
        self.C["audio"] = (rng.standard_normal((n_a, dims["audio"])) / math.sqrt(n_a)).astype(np.float32)
        for m in MODALITIES:  # exactly unit mean square per feature, so cue strengths mean the same for every seed
            C = self.C[m]
            self.C[m] = (C / np.sqrt((C**2).sum() / C.shape[1])).astype(np.float32)
        B = rng.standard_normal((P, dims["audio"]))
        self.B = (B / np.linalg.norm(B, axis=0, keepdims=True)).astype(np.float32)  # unit variance per feature
        self.cfg, self.n_a = cfg, n_a
        # standardisation constants of g from its stationary prior (z: unit variance per coordinate
        # around a mean shifted by an affect of unit variance per coordinate)
        a = rng.standard_normal((_CALIB, n_a)).astype(np.float32)
        z = rng.standard_normal((_CALIB, K)).astype(np.float32) + cfg.latent_shift * (a @ self.M)
        self.g_mean = np.zeros(dims["audio"], np.float32)
        self.g_sd = np.ones(dims["audio"], np.float32)
        g = self.g(z)
        self.g_mean = g.mean(0).astype(np.float32)
        self.g_sd = np.maximum(g.std(0), 1e-6).astype(np.float32)
        # f = (g + cue * a_A C_A) / f_norm has unit mean variance per feature
        self.f_norm = np.float32(math.sqrt(1 + cfg.cue_audio**2 * (1 + _audio_view_noise_var(cfg))))
        if cfg.control == "positive":
            # Block maps for the positive control, from W without new draws (the other worlds stay
            # bit-identical): each feature sees one coordinate of the modality's view, so no single
            # feature's mean or sd moves with the correlation between two coordinates (the label).
            for m in ("text", "vision"):
                W = self.W[m]
                block = np.zeros_like(W)
                cols = np.arange(W.shape[1])
                block[cols % k, cols] = W[cols % k, cols] * math.sqrt(k)  # unit variance per feature from z
                self.W[m] = block
            self.u = (np.ones(n_a) / math.sqrt(n_a)).astype(np.float32)  # iemocap: one combination of the 4 scores

    def g(self, z: np.ndarray) -> np.ndarray:
        """The standardised tanh map g of z (..., K) -> (..., D_a)."""
        pre = z @ self.A1z
        pre *= self.cfg.audio_gain
        pre += self.b1
        np.tanh(pre, out=pre)
        out = pre @ self.A2
        out -= self.g_mean
        out /= self.g_sd
        return out

    def f(self, z: np.ndarray, a_audio: np.ndarray) -> np.ndarray:
        """f(z, a_A) for z (R, K) and audio's affect view at the same rows (R, n_a): (R, D_a)."""
        out = self.g(z)
        if self.cfg.cue_audio:
            out += np.float32(self.cfg.cue_audio) * (a_audio @ self.C["audio"])
        out /= self.f_norm
        return out


def _ar1(rng, n: int, T: int, dim: int, rho: float) -> np.ndarray:
    """n stationary AR(1) paths of T steps in ``dim`` dims with unit variance, float32 (n, T, dim)."""
    x = rng.standard_normal((n, T, dim), dtype=np.float32)
    c = np.float32(math.sqrt(1 - rho * rho))
    r = np.float32(rho)
    for t in range(1, T):
        x[:, t] *= c
        x[:, t] += r * x[:, t - 1]
    return x


def _real_rows(T: int, L: np.ndarray) -> tuple:
    """(sample, step) indices of the real (unpadded) steps of left-padded sequences, in order."""
    return np.nonzero(np.arange(T)[None, :] >= (T - L)[:, None])


def _resample_rows(z: np.ndarray, L0: np.ndarray, T: int, L: np.ndarray, i: np.ndarray, t: np.ndarray) -> np.ndarray:
    """z at the real rows (i, t) of a modality with T steps and true lengths L: (R, K).

    Sample i's trajectory is the last L0[i] of z's T0 steps; its L[i] real steps sample that span
    at evenly spaced points, linearly interpolated (the identity when L == L0 and T == T0)."""
    T0 = z.shape[1]
    j = t - (T - L[i])  # index within the real span
    if T == T0 and np.array_equal(L, L0):
        return z[i, t]
    Li, L0i = L[i], L0[i]
    pos = (T0 - L0i) + j * np.where(Li > 1, (L0i - 1) / np.maximum(Li - 1, 1), 0.0)
    pos = np.clip(pos, 0, T0 - 1)
    i0 = np.floor(pos).astype(np.int64)
    w = (pos - i0).astype(np.float32)[:, None]
    i1 = np.minimum(i0 + 1, T0 - 1)
    z0 = z[i, i0]
    return z0 + w * (z[i, i1] - z0)


def _inject_neg_inf(x: np.ndarray, rate: float, rng) -> None:
    """Set about ``rate`` of the values of x (real rows only) to -inf, in place.

    Draws the count (binomial) and the positions, instead of one uniform per value."""
    k = int(rng.binomial(x.size, rate)) if x.size else 0
    if k:
        x[np.unravel_index(rng.integers(0, x.size, size=k), x.shape)] = -np.inf


def _draw_affect(cfg, task, n, rng):
    """Labels and standardised affect a (n, n_a) of n samples."""
    if task == "regression":
        r = cfg.neutral_rate
        comp = rng.choice(3, size=n, p=[(1 - r) * _MIX_W[0], r, (1 - r) * _MIX_W[1]])
        mu = np.array([-_MIX_MU, 0.0, _MIX_MU])[comp]
        sd = np.array([_MIX_SD, _NEU_SD, _MIX_SD])[comp]
        s = np.clip(mu + sd * rng.standard_normal(n), -3, 3)
        q = np.where(rng.random(n) < 0.7, 0.2, 1 / 3)
        noisy = s + cfg.label_noise * rng.standard_normal(n)
        y = np.clip(np.round(noisy / q) * q, -3, 3).astype(np.float32)
        y[np.abs(y) < 1e-9] = 0.0  # no -0.0
        mean, sdev = _sentiment_moments(r)
        a = ((s - mean) / sdev)[:, None]
        return y, a.astype(np.float32)
    R = np.full((4, 4), cfg.emotion_corr) + (1 - cfg.emotion_corr) * np.eye(4)
    a = rng.standard_normal((n, 4)) @ np.linalg.cholesky(R).T
    tau = np.array([math.sqrt(1 + cfg.label_noise**2) * NormalDist().inv_cdf(1 - p) for p in cfg.emotion_rates])
    y = (a + cfg.label_noise * rng.standard_normal((n, 4)) > tau).astype(np.int64)
    return y, a.astype(np.float32)


def _lv_view(cfg, views) -> tuple:
    """What text and vision jointly show of the affect: the inverse-variance weighted mean of their
    views (the best estimate of a from both) and the variance of its noise."""
    vl, vv = cfg.expr_noise_text**2, cfg.expr_noise_vision**2
    if vl == 0 or vv == 0:
        return views["text" if vl == 0 else "vision"], 0.0
    w = vv / (vl + vv)  # text's weight
    return (w * views["text"] + (1 - w) * views["vision"]).astype(np.float32), vl * vv / (vl + vv)


def _audio_view_noise_var(cfg) -> float:
    """Variance of the noise of audio's affect view (step 2b): expr_noise_audio^2 unless the shared
    part alone is noisier (L + V's combined view noisier than audio's own)."""
    va, s = cfg.expr_noise_audio**2, cfg.audio_shared
    if s == 0:
        return va
    vl, vv = cfg.expr_noise_text**2, cfg.expr_noise_vision**2
    vlv = 0.0 if vl == 0 or vv == 0 else vl * vv / (vl + vv)
    return (1 - s) * va + s * max(va, vlv)


def _mixed_audio_view(cfg, a, views, rng) -> np.ndarray:
    """Audio's affect view with a share ``audio_shared`` of its noise taken from L + V's view (step 2b)."""
    s = cfg.audio_shared
    lv, vlv = _lv_view(cfg, views)
    extra = math.sqrt(max(cfg.expr_noise_audio**2 - vlv, 0.0))  # independent, label-free: keeps the amount fixed
    shared = lv + np.float32(extra) * rng.standard_normal(a.shape).astype(np.float32)
    mixed = a + np.float32(math.sqrt(1 - s)) * (views["audio"] - a) + np.float32(math.sqrt(s)) * (shared - a)
    return mixed.astype(np.float32)


_POS_GAIN = 1.0  # rho_i = tanh(_POS_GAIN * a_i . u): |rho| ~0.7 at the sentiment modes
_POS_SD = 0.9  # a scale for h: measured, h has variance ~1.4 (mosi, seed 0), the mean over audio features of the content's


def _entangle(z: np.ndarray, affect: np.ndarray) -> np.ndarray:
    """The positive control's latent (in place): coordinate 1 of z gets correlation rho_i =
    tanh(_POS_GAIN * affect_i) with coordinate 0 (both seen by text only), and coordinate K-1 the
    same with K-2 (both seen by vision only). Each coordinate stays a unit-variance AR(1) with the
    same coefficient, so no coordinate's mean or variance depends on the affect. Returns rho (n,)."""
    rho = np.tanh(_POS_GAIN * affect.reshape(-1).astype(np.float64)).astype(np.float32)
    c = np.sqrt(1 - rho**2)[:, None]
    r = rho[:, None]
    K = z.shape[2]
    for i, j in ((0, 1), (K - 2, K - 1)):
        z[:, :, j] = r * z[:, :, i] + c * z[:, :, j]
    return rho


def _make_split(cfg, shape, aligned, world, seed, split_idx, n):
    task = shape.task
    T0 = shape.aligned_len
    Ts = shape.lengths(aligned)
    dims = shape.dims
    n_a = world.n_a
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, split_idx)))
    labels, a = _draw_affect(cfg, task, n, rng)
    u = rng.beta(cfg.length_beta[0], cfg.length_beta[1], size=n)
    f_min = cfg.aligned_min_frac if aligned else cfg.unaligned_min_frac
    frac = f_min + (1 - f_min) * u
    views = {m: a + getattr(cfg, f"expr_noise_{m}") * rng.standard_normal((n, n_a)).astype(np.float32) for m in MODALITIES}
    if cfg.audio_shared > 0:  # its own stream: with s = 0 every draw is as it always was
        shared_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(4, split_idx)))
        views["audio"] = _mixed_audio_view(cfg, a, views, shared_rng)
    L0 = np.clip(np.round(frac * T0), 1, T0).astype(np.int64)
    lengths = {m: np.clip(np.round(frac * Ts[m]), 1, Ts[m]).astype(np.int64) for m in MODALITIES}
    feats = {m: np.zeros((n, Ts[m], dims[m]), np.float32) for m in MODALITIES}
    p = cfg.audio_predictability
    sp_, sq_ = np.float32(math.sqrt(p)), np.float32(math.sqrt(1 - p))
    k = world.k
    positive = cfg.control == "positive"
    for c, lo in enumerate(range(0, n, _CHUNK)):
        hi = min(n, lo + _CHUNK)
        sl = slice(lo, hi)
        m_ = hi - lo
        lat = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2, split_idx, c)))
        obs = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(3, split_idx, c, int(aligned))))
        z = _ar1(lat, m_, T0, cfg.latent_dim, cfg.latent_rho)
        if positive:
            _entangle(z, a[sl] @ world.u)  # the label's latent, as within-sample correlations of z
        else:
            z += (cfg.latent_shift * (a[sl] @ world.M))[:, None, :]
        for m in MODALITIES:
            T, L = Ts[m], lengths[m][sl]
            i, t = _real_rows(T, L)  # only real steps are computed; padding stays 0
            zm = _resample_rows(z, L0[sl], T, L, i, t)
            view = views[m][sl]
            if m == "audio":
                if positive:
                    K = cfg.latent_dim
                    h = (zm[:, 0] * zm[:, 1] + zm[:, K - 2] * zm[:, K - 1]) / np.float32(2 * _POS_SD)  # (R,)
                    x = h[:, None] * world.C["audio"][0]  # (R, D_a): audio shows the products linearly
                else:
                    x = world.f(zm, view[i])
                x *= sp_
                if p < 1:
                    rho_f = cfg.private_rho ** (T0 / T)
                    e = _ar1(obs, m_, T, cfg.private_dim, rho_f)[i, t]
                    x += (e @ world.B) * sq_
                    del e
                if cfg.noise_audio:
                    x += np.float32(cfg.noise_audio) * obs.standard_normal(x.shape, dtype=np.float32)
                if cfg.audio_neg_inf_rate > 0:
                    _inject_neg_inf(x, cfg.audio_neg_inf_rate, obs)
            elif positive:  # no affect cue: text and vision show the label only through z's correlations
                zv = zm[:, :k] if m == "text" else zm[:, cfg.latent_dim - k :]
                x = zv @ world.W[m]
                noise = getattr(cfg, f"noise_{m}")
                if noise:
                    x += np.float32(noise) * obs.standard_normal(x.shape, dtype=np.float32)
            else:
                zv = zm[:, :k] if m == "text" else zm[:, cfg.latent_dim - k :]
                x = zv @ world.W[m]
                cue = getattr(cfg, f"cue_{m}")
                if cue:
                    x += (np.float32(cue) * (view @ world.C[m]))[i]
                noise = getattr(cfg, f"noise_{m}")
                if noise:
                    x += np.float32(noise) * obs.standard_normal(x.shape, dtype=np.float32)
            feats[m][lo + i, t] = x
            del x, zm
    ids = np.array([f"synthetic-{SPLITS[split_idx]}-{i:05d}" for i in range(n)], dtype=str)
    return Split(features=feats, lengths=lengths, labels=labels, ids=ids)


def make_synthetic(preset: str = "mosi", aligned: bool = True, scale: float = 1.0, seed: int = 0, **knobs) -> MultimodalDataset:
    """A synthetic dataset in the shapes of ``preset`` (mosi, mosei, iemocap); see the module docstring.

    ``scale`` multiplies the preset's split sizes (at least 8 samples per split); ``knobs`` are
    ``SyntheticConfig`` fields. ``meta.extra`` holds every knob, so
    ``make_synthetic(preset, aligned, scale, seed, **ds.meta.extra)`` rebuilds the same data.
    """
    allowed = knob_names()
    unknown = sorted(set(knobs) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown synthetic knob(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    cfg = SyntheticConfig(**knobs)
    shape = data_shape(preset)
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)) or not (0 < scale < 1e4):
        raise ConfigError(f"synthetic scale={scale!r}: expected a number > 0")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"synthetic seed={seed!r}: expected an integer >= 0")
    seed = int(seed)
    aligned = bool(aligned)
    n_a = 1 if shape.task == "regression" else len(EMOTIONS)
    if cfg.control == "positive" and cfg.latent_dim - math.ceil(cfg.view_frac * cfg.latent_dim) < 2:
        raise ConfigError(f"synthetic knob control='positive' needs at least 2 coordinates of z that only text sees "
                          f"(latent_dim - ceil(view_frac * latent_dim) >= 2), found latent_dim={cfg.latent_dim}, view_frac={cfg.view_frac}")
    world = _World(cfg, shape.dims, n_a, seed)
    splits = {}
    sizes = {"valid": cfg.valid_size, "test": cfg.test_size}
    for si, s in enumerate(SPLITS):
        # a split's samples come from streams keyed by (seed, split), so one split's size never
        # changes another split's samples: a larger test set leaves training as it was
        n = sizes.get(s) or max(8, int(round(shape.split_sizes[s] * scale)))
        splits[s] = _make_split(cfg, shape, aligned, world, seed, si, n)
    meta = DatasetMeta(
        name=shape.name,
        task=shape.task,
        aligned=aligned,
        source=f"synthetic:{shape.name}{'' if aligned else '-unaligned'}:seed={seed}:scale={scale}",
        format="synthetic",
        feature_names={m: [f"{m}_{j:03d}" for j in range(shape.dims[m])] for m in MODALITIES},
        extra=cfg.to_dict(),
    )
    ds = MultimodalDataset(splits=splits, meta=meta)
    if cfg.replace_nonfinite:
        replace_nonfinite(ds)
    validate(ds, shape)
    return ds


# ----------------------------------------------------------------------------------------------
# Probe: how much each modality tells about the label, and how predictable audio is from L + V


def _real_mask(T: int, L: np.ndarray) -> np.ndarray:
    return np.arange(T)[None, :] >= (T - np.asarray(L))[:, None]


def pooled_features(x, lengths, chunk: int = 1024) -> np.ndarray:
    """Mean and sd over each sample's true (unpadded) steps, concatenated: (N, 2D) float64.

    Non-finite values count as 0. Works chunk by chunk, so lazy (h5py) arrays are fine.
    """
    N, T, D = x.shape
    lengths = np.asarray(lengths)
    out = np.zeros((N, 2 * D))
    for lo in range(0, N, chunk):
        xb = np.asarray(x[lo : lo + chunk], dtype=np.float64)
        xb[~np.isfinite(xb)] = 0.0
        L = lengths[lo : lo + chunk]
        m = _real_mask(T, L)[..., None]
        cnt = np.maximum(L, 1)[:, None].astype(np.float64)
        mean = (xb * m).sum(1) / cnt
        var = (((xb - mean[:, None, :]) * m) ** 2).sum(1) / cnt
        out[lo : lo + chunk, :D] = mean
        out[lo : lo + chunk, D:] = np.sqrt(var)
    return out


_LAMBDAS = 10.0 ** np.arange(-3, 4.01, 0.5)


def _r2(y, pred) -> float:
    """Total R^2 over all output columns: 1 - SSE / SST (SST around each column's own mean)."""
    y = y.reshape(len(y), -1)
    pred = pred.reshape(len(pred), -1)
    sst = ((y - y.mean(0)) ** 2).sum()
    return float(1 - ((y - pred) ** 2).sum() / sst) if sst > 0 else float("nan")


def ridge_r2(Xtr, ytr, Xva, yva, Xte, yte, lambdas=_LAMBDAS) -> tuple:
    """Closed-form ridge (inputs standardised on train, intercept unpenalised), the penalty
    (relative to the number of training rows) chosen by validation R^2; returns (test R^2, lambda)."""
    predict, lam = ridge_fit(Xtr, ytr, Xva, yva, lambdas)
    yte = np.asarray(yte, dtype=np.float64).reshape(len(yte), -1)
    return _r2(yte, predict(Xte)), lam


def ridge_fit(Xtr, ytr, Xva, yva, lambdas=_LAMBDAS) -> tuple:
    """``ridge_r2``'s fit: (predict, lambda), ``predict(X)`` -> (N, outputs) float64."""
    mu, sd = Xtr.mean(0), Xtr.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    Z = (Xtr - mu) / sd
    ytr, yva = (np.asarray(v, dtype=np.float64).reshape(len(v), -1) for v in (ytr, yva))
    ym = ytr.mean(0)
    G = Z.T @ Z / len(Z)
    evals, V = np.linalg.eigh(G)
    b = V.T @ (Z.T @ (ytr - ym) / len(Z))
    Zva = (Xva - mu) / sd
    best = (-np.inf, None, None)
    for lam in lambdas:
        w = V @ (b / (np.maximum(evals, 0) + lam)[:, None])
        r = _r2(yva, Zva @ w + ym)
        if r > best[0]:
            best = (r, lam, w)
    _, lam, w = best
    return (lambda X: ((X - mu) / sd) @ w + ym), float(lam)


def _step_rows(sp, rng, max_rows):
    """Paired rows (audio step, the text and vision steps at the same relative time) of a split."""
    if not all(isinstance(x, np.ndarray) for x in sp.features.values()):
        sp = sp.load()  # lazy (h5py) arrays do not take point indexing
    La = np.asarray(sp.lengths["audio"])
    Ta = sp.audio.shape[1]
    total = int(La.sum())
    take = min(max_rows, total)
    flat = np.sort(rng.choice(total, size=take, replace=False)) if take < total else np.arange(total)
    starts = np.concatenate([[0], np.cumsum(La)[:-1]])
    i = np.searchsorted(starts, flat, side="right") - 1
    j = flat - starts[i]  # step within the real span
    rel = (j + 0.5) / La[i]
    out = {"audio": np.asarray(sp.audio[i, Ta - La[i] + j], dtype=np.float64)}
    for m in ("text", "vision"):
        Lm = np.asarray(sp.lengths[m])[i]
        Tm = sp.features[m].shape[1]
        jm = np.minimum(np.floor(rel * Lm).astype(np.int64), Lm - 1)
        out[m] = np.asarray(sp.features[m][i, Tm - Lm + jm], dtype=np.float64)
    for v in out.values():
        v[~np.isfinite(v)] = 0.0
    return out


def _pca_basis(X, r):
    mu = X.mean(0)
    sd = np.where(X.std(0) > 1e-12, X.std(0), 1.0)
    Z = (X - mu) / sd
    evals, V = np.linalg.eigh(Z.T @ Z / len(Z))
    idx = np.argsort(evals)[::-1][:r]
    return mu, sd, V[:, idx] / np.sqrt(np.maximum(evals[idx], 1e-12))


def _nonlinear_map(rows, bases, W, b):
    """[L, V] plus random Fourier features of their whitened top principal components."""
    P = np.concatenate([((rows[m] - mu) / sd) @ V for m, (mu, sd, V) in bases.items()], axis=1)
    return np.concatenate([rows["text"], rows["vision"], np.cos(P @ W + b)], axis=1)


def probe(ds: MultimodalDataset, max_rows: int = 20000, n_components: int = 6, n_fourier: int = 600, seed: int = 0) -> dict:
    """Ridge-regression probes of a dataset, numpy only: fit on train, penalty on valid, R^2 on test.

    Keys:
    - ``label_r2_text``, ``label_r2_audio``, ``label_r2_vision``, ``label_r2_lv`` (text+vision),
      ``label_r2_lva`` (all three): R^2 of the label from time-pooled features (mean and sd over
      each sample's true steps) of those modalities. Emotions: R^2 over the four 0/1 columns.
    - ``audio_r2_linear``: R^2 of per-step audio from the text and vision features at the same
      relative time (up to ``max_rows`` steps per split), linearly;
    - ``audio_r2_nonlinear``: the same with, in addition, ``n_fourier`` random Fourier features of
      the whitened top ``n_components`` principal components of text and of vision;
    - ``n_train``, ``n_test``, ``task``.

    Steps are paired by relative time within each sample's true span: audio step j of L_a is paired
    with text / vision step floor((j + 0.5) / L_a * L_m), the same step when aligned. Up to
    ``max_rows`` audio steps are drawn per split (``seed``). Inputs are standardised on train, the
    ridge penalty is chosen on valid from 1e-3 .. 1e4 (times the number of rows), and R^2 is the
    total over output columns on test (1 - SSE / SST). Non-finite values count as 0.

    Measured with the defaults (``probe(make_synthetic("mosi", seed=s))``, mosi aligned, scale 1):

        seed  text   audio  vision  L+V    L+V+A  | audio per step: linear  non-linear
        0     0.501  0.369  0.195   0.533  0.586  |                 0.540   0.623
        1     0.533  0.319  0.201   0.565  0.608  |                 0.517   0.614
        2     0.477  0.379  0.155   0.499  0.549  |                 0.534   0.618

    (mosi unaligned, same seeds: text 0.49-0.55, audio 0.31-0.40, vision 0.18-0.23, L+V 0.52-0.58,
    L+V+A 0.58-0.62; audio per step 0.49-0.51 linear, 0.58-0.59 non-linear.)

    Uses threadpoolctl, when installed, to run BLAS on one thread while it works.
    """
    with _one_blas_thread():
        return _probe(ds, max_rows, n_components, n_fourier, seed)


def _one_blas_thread():
    """Limit BLAS to one thread for the probe's small dense problems, if threadpoolctl is there.

    Multi-threaded OpenBLAS eigh on a ~600 x 600 matrix can be 100x slower than one thread when
    the cores are shared with other processes; the limit is undone on exit."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _probe(ds, max_rows, n_components, n_fourier, seed) -> dict:
    rng = np.random.default_rng(seed)
    regression = ds.meta.task == "regression"
    res: dict = {}
    pooled = {s: {m: pooled_features(ds[s].features[m], ds[s].lengths[m]) for m in MODALITIES} for s in SPLITS}
    y = {s: np.asarray(ds[s].labels, dtype=np.float64).reshape(len(ds[s]), -1) for s in SPLITS}
    groups = {"text": ("text",), "audio": ("audio",), "vision": ("vision",), "lv": ("text", "vision"), "lva": ("text", "vision", "audio")}
    for name, mods in groups.items():
        X = {s: np.concatenate([pooled[s][m] for m in mods], axis=1) for s in SPLITS}
        r2, _ = ridge_r2(X["train"], y["train"], X["valid"], y["valid"], X["test"], y["test"])
        res[f"label_r2_{name}"] = r2
    rows = {s: _step_rows(ds[s], rng, max_rows) for s in SPLITS}
    lin = {s: np.concatenate([rows[s]["text"], rows[s]["vision"]], axis=1) for s in SPLITS}
    ya = {s: rows[s]["audio"] for s in SPLITS}
    res["audio_r2_linear"], _ = ridge_r2(lin["train"], ya["train"], lin["valid"], ya["valid"], lin["test"], ya["test"])
    bases = {m: _pca_basis(rows["train"][m], min(n_components, rows["train"][m].shape[1])) for m in ("text", "vision")}
    d_in = sum(V.shape[1] for _, _, V in bases.values())
    W = rng.standard_normal((d_in, n_fourier)) / math.sqrt(d_in)  # bandwidth ~ the input scale
    b = rng.uniform(0, 2 * math.pi, n_fourier)
    nl = {s: _nonlinear_map(rows[s], bases, W, b) for s in SPLITS}
    res["audio_r2_nonlinear"], _ = ridge_r2(nl["train"], ya["train"], nl["valid"], ya["valid"], nl["test"], ya["test"])
    res["n_train"] = len(ds["train"])
    res["n_test"] = len(ds["test"])
    res["task"] = "regression" if regression else "emotions"
    return res


def _step_moments(x, lengths, mu, sd, V) -> np.ndarray:
    """Per sample, the mean over true steps of the whitened components P = ((x - mu) / sd) V and
    of their pairwise products P_r P_s (r <= s): (N, r + r (r + 1) / 2), a quadratic feature map."""
    N, T, _ = x.shape
    x = np.asarray(x, dtype=np.float64).copy()
    x[~np.isfinite(x)] = 0.0
    m = _real_mask(T, lengths)[..., None]  # (N, T, 1)
    P = ((x - mu) / sd) @ V * m  # (N, T, r), padding 0
    cnt = np.maximum(np.asarray(lengths), 1)[:, None].astype(np.float64)
    r = P.shape[2]
    iu = np.triu_indices(r)
    second = np.einsum("ntr,nts->nrs", P, P)[:, iu[0], iu[1]]  # (N, r (r + 1) / 2)
    return np.concatenate([P.sum(1), second], axis=1) / cnt


def control_probes(ds: MultimodalDataset, n_components: int = 6, n_fourier: int = 600, max_rows: int = 20000, seed: int = 0) -> dict:
    """``probe`` plus what a reconstruction of audio could teach:

    - ``label_r2_lv_quadratic``: R^2 of the label from a quadratic map of L + V (per modality, the
      within-sample means of the top ``n_components`` whitened principal components and of their
      pairwise products). Does a simple non-linear map of L + V determine what the label needs,
      where the linear one (``label_r2_lv``) does not?
    - ``label_r2_ahat`` and ``label_r2_lv_ahat``: R^2 of the label from time-pooled A^, alone and
      beside L + V, where A^ is ``probe``'s non-linear per-step reconstruction of audio from L and
      V (ridge on random Fourier features, fit on training steps without labels): a closed-form
      stand-in for kt's A'. ``label_r2_lv_ahat`` - ``label_r2_lv`` is what A^ adds to L + V read
      linearly; ``label_r2_audio`` (real audio) bounds what a perfect A' could show.

    Ridge as in ``probe`` (fit on train, penalty on valid, R^2 on test)."""
    with _one_blas_thread():
        res = _probe(ds, max_rows, n_components, n_fourier, seed)
        rng = np.random.default_rng(seed)
        rows = _step_rows(ds["train"], rng, max_rows)
        feats = {s: [] for s in SPLITS}
        for m in ("text", "vision"):
            mu, sd, V = _pca_basis(rows[m], min(n_components, rows[m].shape[1]))
            for s in SPLITS:
                feats[s].append(_step_moments(ds[s].features[m], ds[s].lengths[m], mu, sd, V))
        X = {s: np.concatenate(feats[s], axis=1) for s in SPLITS}
        y = {s: np.asarray(ds[s].labels, dtype=np.float64).reshape(len(ds[s]), -1) for s in SPLITS}
        res["label_r2_lv_quadratic"], _ = ridge_r2(X["train"], y["train"], X["valid"], y["valid"], X["test"], y["test"])
        # A^: per-step audio from L and V (the probe's non-linear map), then pooled like real audio
        fit_rows = {s: _step_rows(ds[s], rng, max_rows) for s in ("train", "valid")}
        bases = {m: _pca_basis(fit_rows["train"][m], min(n_components, fit_rows["train"][m].shape[1])) for m in ("text", "vision")}
        d_in = sum(V.shape[1] for _, _, V in bases.values())
        W = rng.standard_normal((d_in, n_fourier)) / math.sqrt(d_in)
        b = rng.uniform(0, 2 * math.pi, n_fourier)
        nl = {s: _nonlinear_map(fit_rows[s], bases, W, b) for s in fit_rows}
        predict, _ = ridge_fit(nl["train"], fit_rows["train"]["audio"], nl["valid"], fit_rows["valid"]["audio"])
        ahat = {s: _pooled_reconstruction(ds[s], lambda r: predict(_nonlinear_map(r, bases, W, b))) for s in SPLITS}
        lv = {s: np.concatenate([pooled_features(ds[s].features[m], ds[s].lengths[m]) for m in ("text", "vision")], axis=1) for s in SPLITS}
        for name, X in (("ahat", ahat), ("lv_ahat", {s: np.concatenate([lv[s], ahat[s]], axis=1) for s in SPLITS})):
            res[f"label_r2_{name}"], _ = ridge_r2(X["train"], y["train"], X["valid"], y["valid"], X["test"], y["test"])
    return res


def _pooled_reconstruction(sp, predict, chunk: int = 4096) -> np.ndarray:
    """Mean and sd over each sample's real audio steps of ``predict(rows)``, where rows pair every
    real audio step with text and vision at the same relative time (``_step_rows``): (N, 2 D_a)."""
    rows = _step_rows(sp, np.random.default_rng(0), 10**12)  # every step, in (sample, step) order
    La = np.asarray(sp.lengths["audio"])
    pred = np.concatenate([predict({m: v[lo : lo + chunk] for m, v in rows.items()}) for lo in range(0, len(rows["audio"]), chunk)])
    starts = np.concatenate([[0], np.cumsum(La)[:-1]])
    cnt = np.maximum(La, 1)[:, None]
    mean = np.add.reduceat(pred, starts, axis=0) / cnt
    sq = np.add.reduceat(pred**2, starts, axis=0) / cnt
    return np.concatenate([mean, np.sqrt(np.maximum(sq - mean**2, 0))], axis=1)


# ----------------------------------------------------------------------------------------------
# Knobs in a data source string: synthetic:mosi?audio_shared=0.5&audio_gain=3


def parse_knobs(query: str, source: str = "") -> dict:
    """``"audio_shared=0.5&audio_gain=3"`` -> ``{"audio_shared": 0.5, "audio_gain": 3.0}``, typed as
    the ``SyntheticConfig`` fields (tuples comma-separated: ``length_beta=1.5,2.5``; booleans
    true/false). A data source ``synthetic:<preset>?<query>`` carries knobs through ``Config.data``,
    the CLI and papermill. Raises a one-line ConfigError naming ``source`` and the bad knob."""
    where = f"data {source!r}: " if source else ""
    types = {f.name: f.type if isinstance(f.type, str) else f.type.__name__ for f in fields(SyntheticConfig)}
    knobs: dict = {}
    for part in query.split("&"):
        name, eq, text = part.partition("=")
        name, text = name.strip(), text.strip()
        if not eq or not name or not text:
            raise ConfigError(f"{where}synthetic knob {part!r} is not name=value (e.g. synthetic:mosi?audio_shared=0.5)")
        if name not in types:
            raise ConfigError(f"{where}unknown synthetic knob {name!r}; allowed: {', '.join(types)}")
        if name in knobs:
            raise ConfigError(f"{where}synthetic knob {name!r} is given twice")
        kind = types[name]
        try:
            if kind == "bool":
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                value = text.lower() in ("true", "1")
            elif kind == "str":
                value = text
            elif kind == "int":
                value = int(text)
            elif kind == "tuple":
                value = tuple(float(v) for v in text.split(","))
            else:
                value = float(text)
        except ValueError:
            expected = {"bool": "true or false", "int": "an integer", "tuple": "comma-separated numbers"}.get(kind, "a number")
            raise ConfigError(f"{where}synthetic knob {name}={text!r}: expected {expected}") from None
        knobs[name] = value
    try:
        SyntheticConfig(**knobs)  # range errors now, naming the knob
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None
    return knobs


# A synthetic data source: synthetic:<preset>[-unaligned][?knob=value&...] (the prefix is optional).
SOURCE_RE = re.compile(r"^(?:synthetic:)?(mosi|mosei|iemocap)(-unaligned)?(?:\?(.*))?$")


def with_knobs(source: str, **knobs) -> str:
    """``source`` (a synthetic data source such as ``synthetic:mosi``, maybe with knobs already)
    with ``knobs`` set: ``with_knobs("synthetic:mosi", audio_shared=0.5)`` ->
    ``"synthetic:mosi?audio_shared=0.5"``. Checked as ``parse_knobs`` checks them."""
    m = SOURCE_RE.match(str(source))
    if not m:
        raise ConfigError(f"data {source!r}: generator knobs need a synthetic source such as synthetic:mosi")
    merged = parse_knobs(m.group(3), source) if m.group(3) is not None else {}
    merged.update(knobs)
    if not merged:
        return f"synthetic:{m.group(1)}{m.group(2) or ''}"

    def text(v):
        if isinstance(v, (bool, np.bool_)):
            return "true" if v else "false"
        if isinstance(v, (tuple, list)):
            return ",".join(f"{float(x):g}" for x in v)
        return repr(v) if isinstance(v, float) else str(v)

    query = "&".join(f"{k}={text(v)}" for k, v in merged.items())
    out = f"synthetic:{m.group(1)}{m.group(2) or ''}?{query}"
    parse_knobs(query, out)
    return out
