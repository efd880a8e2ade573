"""InstantID's IdentityNet on a face concept's rows only: before each UNet call it runs on
those rows (their latent, timesteps and SDXL vector, the identity tokens as its context, the
face keypoints drawn where the face goes), and its residuals, scaled by the concept's
`control`, are added where a ControlNet's are: input block i's to the skip connection that
output block N-1-i reads, the last to the middle block's output. Other rows are untouched."""

from __future__ import annotations


def _argument(args, kwargs, name: str, position: int):
    """A UNet forward argument passed by name (A1111's sgm) or by position (Forge)."""
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


def make_unet_forward(original, run, net):
    """The UNet's forward(x, timesteps, context, y, ...): the face rows' residuals computed first."""
    def forward(x, *args, **kwargs):
        call = run.call
        faces = getattr(call, "faces", None) if call is not None else None
        if faces:
            _move(net, x)
            timesteps = _argument(args, kwargs, "timesteps", 0)
            y = _argument(args, kwargs, "y", 2)
            call.residuals = {}
            for index, face in faces.items():
                if face.control <= 0 or face.hint is None:
                    continue
                t = timesteps.expand(x.shape[0]) if timesteps.dim() == 0 else timesteps
                residuals = net(x[face.rows], t[face.rows], face.tokens.to(x.device, x.dtype),
                                None if y is None else y[face.rows], face.hint.to(x.device, x.dtype))
                call.residuals[index] = (face.rows, [r * face.control for r in residuals])
        return original(x, *args, **kwargs)
    return forward


def _move(net, like) -> None:
    """The IdentityNet on the UNet's device and dtype (the host may move the UNet between jobs)."""
    weight = next(net.parameters())
    if weight.device != like.device or weight.dtype != like.dtype:
        net.to(like.device, like.dtype)


def _residuals(run) -> dict:
    call = run.call
    if call is None:
        return {}
    return getattr(call, "residuals", None) or {}


def make_skip_forward(original, run, index: int):
    """Output block's first layer (a ResBlock; its input is cat(h, skip)): residual `index`
    added to the skip channels of the face rows."""
    def forward(x, *args, **kwargs):
        found = _residuals(run)
        if found:
            x = x.clone()
            for rows, residuals in found.values():
                r = residuals[index]
                x[rows, -r.shape[1]:] = x[rows, -r.shape[1]:] + r.to(x.dtype)
        return original(x, *args, **kwargs)
    return forward


def make_middle_forward(original, run):
    """The middle block's last layer: the last residual added to the face rows' output."""
    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        found = _residuals(run)
        if found:
            out = out.clone()
            for rows, residuals in found.values():
                out[rows] = out[rows] + residuals[-1].to(out.dtype)
        return out
    return forward
