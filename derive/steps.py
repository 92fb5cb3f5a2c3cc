"""The general steps of a derivation, for every size: from the chain rule to the closed form.

The worked example of ``derive.report`` shows the gradient element by element for one
small configuration.  Before it, a derivation shows the same result for all sizes, the way
a textbook does: the chain rule as a sum with an indicator of where an input element is
read (the scatter sum), that indicator solved for the kernel index, the renamings that
expose dilate, rot180 and crop, and the ranges that become the padding.  Each step is an
equality of index expressions; ``cnnderive verify --all-sizes`` proves the first and the
last equal for symbolic sizes (``derive.allsizes``).

Steps are (kind, LaTeX) pairs: "text" is prose with inline ``$...$`` math, "math" a display.
"""

from __future__ import annotations

_CONV = (
    (
        "text",
        r"Input gradient. The padded input is read at $\tilde{X}_{n,si+u,sj+v,c}$, and "
        r"$\tilde{X}_{n,h+p,w+p,c} = X_{n,h,w,c}$, so an output element reaches $X_{n,h,w,c}$ "
        r"exactly when $si + u = h + p$ and $sj + v = w + p$. The chain rule is a sum over every "
        r"output element and kernel position, kept where the read lands on $(h, w)$:",
    ),
    (
        "math",
        r"\frac{\partial L}{\partial X_{n,h,w,c}} = \sum_{o=0}^{C_{\mathrm{out}}-1}"
        r" \sum_{i=0}^{H'-1} \sum_{j=0}^{W'-1} \sum_{u=0}^{K_H-1} \sum_{v=0}^{K_W-1}"
        r" \delta_{n,i,j,o}\, W_{u,v,c,o}\; \mathbf{1}[si + u = h + p]\; \mathbf{1}[sj + v = w + p]",
    ),
    (
        "text",
        r"Solve each constraint for the kernel index: $u = h + p - si$, $v = w + p - sj$. "
        r"The sums over $u$ and $v$ disappear, and their ranges move to $i$ and $j$:",
    ),
    (
        "math",
        r"\frac{\partial L}{\partial X_{n,h,w,c}} = \sum_{o}"
        r" \sum_{\substack{0 \le i < H' \\ 0 \le h + p - si < K_H}}"
        r" \sum_{\substack{0 \le j < W' \\ 0 \le w + p - sj < K_W}}"
        r" \delta_{n,i,j,o}\, W_{h+p-si,\, w+p-sj,\, c,\, o}",
    ),
    (
        "text",
        r"Rename $t = si$, $r = sj$. Only multiples of $s$ occur, which is what the dilated "
        r"gradient $D = \operatorname{dilate}_s(\delta)$ says: $D_{n,t,r,o} = \delta_{n,t/s,r/s,o}$ "
        r"when $s$ divides $t$ and $r$, and 0 otherwise, for $0 \le t \le s(H'-1)$:",
    ),
    (
        "math",
        r"\frac{\partial L}{\partial X_{n,h,w,c}} = \sum_{o}"
        r" \sum_{\substack{0 \le h + p - t < K_H}} \sum_{\substack{0 \le w + p - r < K_W}}"
        r" D_{n,t,r,o}\, W_{h+p-t,\, w+p-r,\, c,\, o}",
    ),
    (
        "text",
        r"The kernel is read backwards: with $R = \operatorname{rot180}(W)$, "
        r"$R_{a,b,c,o} = W_{K_H-1-a,\, K_W-1-b,\, c,\, o}$, rename $a = K_H - 1 - (h + p - t)$, "
        r"$b = K_W - 1 - (w + p - r)$. Then $t = (h + p) + a - (K_H - 1)$ runs forwards with $a$:",
    ),
    (
        "math",
        r"\frac{\partial L}{\partial X_{n,h,w,c}} = \sum_{o} \sum_{a=0}^{K_H-1}"
        r" \sum_{b=0}^{K_W-1} D_{n,\,(h+p)+a-(K_H-1),\,(w+p)+b-(K_W-1),\,o}\;"
        r" R_{a,b,c,o}",
    ),
    (
        "text",
        r"Reads of $D$ outside its rows and columns are zero, as if $D$ were padded by "
        r"$K_H - 1$ rows and $K_W - 1$ columns on every side: that is the full convolution "
        r"$F = \operatorname{full\_convolve}(D, R)$ at position $(h + p, w + p)$. As $h$ "
        r"runs over $0, \ldots, H - 1$, the position runs over $p, \ldots, H + p - 1$: the "
        r"padding becomes a crop of $p$ rows and columns, and positions beyond $F$ (rows "
        r"that no window reached) read zero:",
    ),
    (
        "math",
        r"\frac{\partial L}{\partial X} = \operatorname{crop}_{p,p}^{H \times W}\left("
        r"\operatorname{full\_convolve}\left(\operatorname{dilate}_s(\delta),\ "
        r"\operatorname{rot180}(W)\right)\right)",
    ),
    (
        "text",
        r"Kernel gradient. $W_{u,v,c,o}$ is read once by every output element of channel "
        r"$o$, together with $\tilde{X}_{n,si+u,sj+v,c}$:",
    ),
    (
        "math",
        r"\frac{\partial L}{\partial W_{u,v,c,o}} = \sum_{n=0}^{m-1} \sum_{i=0}^{H'-1}"
        r" \sum_{j=0}^{W'-1} \delta_{n,i,j,o}\, \tilde{X}_{n,\,si+u,\,sj+v,\,c}"
        r" = \sum_{n} \sum_{t=0}^{s(H'-1)} \sum_{r=0}^{s(W'-1)} D_{n,t,r,o}\,"
        r" \tilde{X}_{n,\,t+u,\,r+v,\,c}",
    ),
    (
        "text",
        r"with the same renaming $t = si$, $r = sj$ and $D = \operatorname{dilate}_s(\delta)$. "
        r"That is the correlation of $\tilde{X}$ with $D$, summed over the batch; rows of "
        r"$\tilde{X}$ from $K_H + s(H'-1)$ on (and columns likewise) never meet $D$, so they "
        r"are cropped away:",
    ),
    (
        "math",
        r"\frac{\partial L}{\partial W} = \operatorname{correlate}_{\Sigma n}\left("
        r"\operatorname{crop}_{0,0}^{(K_H + s(H'-1)) \times (K_W + s(W'-1))}(\tilde{X}),\ "
        r"\operatorname{dilate}_s(\delta)\right),\qquad"
        r" \frac{\partial L}{\partial b_o} = \sum_{n,i,j} \delta_{n,i,j,o}",
    ),
)

_POOL_COMMON = (
    (
        "text",
        r"Solve the constraint for the window position: $u = h - si$, so $i$ ranges over "
        r"the windows that contain row $h$, $0 \le h - si < k$ and $0 \le i < H'$ (likewise $j$):",
    ),
)

_AVGPOOL = (
    (
        "text",
        r"Each output element reads $X_{n,si+u,sj+v,c}$ for $0 \le u, v < k$, divided by "
        r"$k^2$. The chain rule keeps the reads that land on $(h, w)$:",
    ),
    (
        "math",
        r"\frac{\partial L}{\partial X_{n,h,w,c}} = \frac{1}{k^2} \sum_{i=0}^{H'-1}"
        r" \sum_{j=0}^{W'-1} \sum_{u=0}^{k-1} \sum_{v=0}^{k-1} \delta_{n,i,j,c}\;"
        r" \mathbf{1}[si + u = h]\; \mathbf{1}[sj + v = w]",
    ),
    *_POOL_COMMON,
    (
        "math",
        r"\frac{\partial L}{\partial X_{n,h,w,c}} = \sum_{\substack{0 \le i < H' \\"
        r" 0 \le h - si < k}} \sum_{\substack{0 \le j < W' \\ 0 \le w - sj < k}}"
        r" \frac{\delta_{n,i,j,c}}{k^2}",
    ),
    (
        "text",
        r"Every $\delta_{n,i,j,c}/k^2$ is added to each of the $k \times k$ positions of its "
        r"window: the scatter-add. When $s = k$ the windows tile the input: $i = \lfloor h/k "
        r"\rfloor$ is the only window, if $h < kH'$, and none otherwise; so the gradient is "
        r"$\delta/k^2$ copied to $k \times k$ blocks, cropped to $H \times W$ (rows from $kH'$ on "
        r"read zero):",
    ),
    (
        "math",
        r"\frac{\partial L}{\partial X} = \operatorname{crop}_{0,0}^{H \times W}\left("
        r"\operatorname{kron}\left(\frac{\delta}{k^2},\ \mathrm{ones}(k \times k)\right)\right)"
        r" \quad \text{when } s = k",
    ),
)

_MAXPOOL = (
    (
        "text",
        r"Each output element is $\sum_{u,v} X_{n,si+u,sj+v,c}\, "
        r"\mathbf{1}^{\mathrm{first\,max}}_{n,i,j,c,u,v}$, and the indicator is held fixed (the "
        r"tie rule). The chain rule keeps the reads that land on $(h, w)$:",
    ),
    (
        "math",
        r"\frac{\partial L}{\partial X_{n,h,w,c}} = \sum_{i,j} \sum_{u,v=0}^{k-1}"
        r" \delta_{n,i,j,c}\, \mathbf{1}^{\mathrm{first\,max}}_{n,i,j,c,u,v}\;"
        r" \mathbf{1}[si + u = h]\; \mathbf{1}[sj + v = w]",
    ),
    *_POOL_COMMON,
    (
        "math",
        r"\frac{\partial L}{\partial X_{n,h,w,c}} = \sum_{\substack{0 \le i < H' \\"
        r" 0 \le h - si < k}} \sum_{\substack{0 \le j < W' \\ 0 \le w - sj < k}}"
        r" \delta_{n,i,j,c}\, \mathbf{1}^{\mathrm{first\,max}}_{n,i,j,c,\,h-si,\,w-sj}",
    ),
    (
        "text",
        r"So each $\delta_{n,i,j,c}$ goes to one position of its window, the first "
        r"maximum $(si + u^*, sj + v^*)$, and is added where overlapping windows share it: the "
        r"argmax routing.",
    ),
)

_DENSE = (
    (
        "text",
        r"$X_{n,d}$ is read only by the outputs $Z_{n,o}$ of its own example, once each, "
        r"with the weight $W_{d,o}$; $W_{d,o}$ by every example's $Z_{n,o}$:",
    ),
    (
        "math",
        r"\frac{\partial L}{\partial X_{n,d}} = \sum_{n'=0}^{m-1} \sum_{o=0}^{D_{\mathrm{out}}-1}"
        r" \sum_{d'=0}^{D_{\mathrm{in}}-1} \delta_{n',o}\, W_{d',o}\, \mathbf{1}[n' = n]\,"
        r" \mathbf{1}[d' = d] = \sum_{o} \delta_{n,o} W_{d,o} = (\delta W^{\mathsf{T}})_{n,d}",
    ),
    (
        "math",
        r"\frac{\partial L}{\partial W_{d,o}} = \sum_{n} X_{n,d}\, \delta_{n,o}"
        r" = (X^{\mathsf{T}} \delta)_{d,o},\qquad \frac{\partial L}{\partial b_o} = \sum_n \delta_{n,o}",
    ),
)

GENERAL_STEPS = {"conv2d": _CONV, "avgpool2d": _AVGPOOL, "maxpool2d": _MAXPOOL, "dense": _DENSE}


def general_steps(layer_name: str) -> tuple[tuple[str, str], ...]:
    """The general steps of ``layer_name``'s derivation, or () if it has none (the
    pointwise layers: their chain rule is already the closed form)."""
    return GENERAL_STEPS.get(layer_name, ())
