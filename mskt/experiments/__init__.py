"""Experiments over trained runs: variants x seeds grids, the robustness sweep, ``mskt bench`` (with
the public MulT code as its baseline), and the paper's numbers to set beside ours."""
