"""The columns of a fused-step coefficient row, as csrc/include/fastddpm/step.h numbers them (the
extensions export theirs as layout()["coef_columns"]; tests/test_layout.py asserts they agree).

Every step is x0 = a_x x_t + a_m m, clipped to [-clip, clip] if clip > 0, then
x_prev = c_x0 x0 + d_x x_t + d_m m + h1 H1 + h2 H2 + sigma z, where H1, H2 are the x0 predictions
of the previous two steps (multistep samplers; 0 for DDPM and DDIM); schedulers.py fills the rows.
pad, pad2, pad3 are padding (a row is 48 bytes)."""

COEF_COLUMNS = ("ax", "am", "cx0", "dx", "dm", "sigma", "clip", "pad", "h1", "h2", "pad2", "pad3")
COEF_WIDTH = len(COEF_COLUMNS)
A_X, A_M, C_X0, D_X, D_M, SIGMA, CLIP, PAD, H1, H2 = range(10)
