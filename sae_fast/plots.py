"""PNG plots of a training run (matplotlib, Agg backend; nothing is shown on screen)."""

from __future__ import annotations

from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(path: Path, history: list[dict]) -> Path:
    """FVU (log scale), L0 and the dead share against the step."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [h["step"] for h in history]
    axes[0].plot(steps, [h["fvu"] for h in history])
    axes[0].set(xlabel="step", ylabel="FVU", yscale="log", title="reconstruction")
    axes[1].plot(steps, [h["l0"] for h in history], label="L0")
    axes[1].plot(steps, [100 * h["dead_frac"] for h in history], label="dead %")
    axes[1].set(xlabel="step", title="sparsity")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_feature_density(path: Path, density: torch.Tensor) -> Path:
    """Histogram of log10 firing frequency per latent (latents that never fired counted apart)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.hist(density[density > 0].log10().cpu().numpy(), bins=40)
    ax.set(xlabel="log10 firing frequency", ylabel="latents",
           title=f"feature density ({int((density == 0).sum())} never fired)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_recovery(path: Path, best_cosine: torch.Tensor) -> Path:
    """Histogram of each true feature's best cosine with a decoder row (synthetic data)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.hist(best_cosine.cpu().numpy(), bins=40)
    ax.axvline(0.9, color="k", lw=0.8)
    ax.set(xlabel="best cosine with a decoder row", ylabel="true features", title="feature recovery")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
