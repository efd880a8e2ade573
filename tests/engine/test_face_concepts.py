"""Face concepts (InstantID) in the engine, on SDXL's real `sgm` UNet at a tiny config: the
IP-Adapter and the IdentityNet come from files in the official formats (tests/instantid_files.py:
the IP-Adapter's state dict as InstantID ships it, the IdentityNet written by diffusers' own
ControlNetModel) through the real loaders. A face concept's rows get InstantID's identity
attention and the IdentityNet's residuals; every other row of the call is bit-identical to a
run without the face concept. The reference for the face rows is computed here the way
InstantID's pipeline does it (attention processors adding `scale * attention(q, k_ip, v_ip)`
before to_out; ControlNet residuals added to the skip connections as ldm's ControlledUnetModel
adds them), on a merged copy of the concept's LoRA."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from k_diffusion.external import CompVisDenoiser

from lib_mc.engine import HostPass, MultiConceptSession, make_session
from lib_mc.faces.instantid.identitynet import load_identitynet
from lib_mc.faces.instantid.ip_adapter import load_ip_adapter
from lib_mc.methods.faces import FaceIdentity, InstantID
from lib_mc.methods.faces.placement import hint_image, place_faces
from lib_mc.plan import build_plan
from instantid_files import write_identitynet_folder, write_ip_adapter
from tinyhost import merged_copy
from test_sdxl import one_call
from tinyxl import TinyXL, XLCFGHost, make_xl_unet, write_xl_lora, xl_cond

IMAGE = (128, 128)
CTX = "crossattn"
# the photo's five keypoints inside its face box (eyes, nose, mouth corners)
KPS_IN_BOX = np.array([[0.3, 0.35], [0.7, 0.35], [0.5, 0.55], [0.35, 0.75], [0.65, 0.75]])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("instantid")
    unet = make_xl_unet()
    write_ip_adapter(folder / "ip-adapter.bin", unet, seed=1)
    write_identitynet_folder(folder / "ControlNetModel", seed=2)
    ip = load_ip_adapter(str(folder / "ip-adapter.bin"), unet)
    net = load_identitynet(str(folder / "ControlNetModel"))
    embedding = torch.randn(512, generator=torch.Generator().manual_seed(3)) * 20   # ArcFace's raw scale
    from lib_mc.lora import load_network
    parts = write_xl_lora(folder / "alice.safetensors", unet, seed=10)
    return dict(unet=unet, ldm=TinyXL(unet), ip=ip, net=net, embedding=embedding, parts=parts,
                lora=load_network(str(folder / "alice.safetensors")),
                cond=xl_cond(1), uncond=xl_cond(2), alice_cond=xl_cond(3), bob_cond=xl_cond(4))


def identity(world, weight=0.8, control=0.8):
    cond, uncond = world["ip"].tokens(world["embedding"])
    return FaceIdentity(world["embedding"].numpy(), KPS_IN_BOX, weight, control, cond, uncond)


def column(lo, hi):
    mask = torch.zeros(IMAGE)
    mask[:, lo:hi] = 1
    return mask


def plan_for(world, face=None, **options):
    models = InstantID(dict(world["ip"].layers), world["net"]) if face is not None else None
    return build_plan([
        dict(name="alice", cond=world["alice_cond"], loras=[(world["lora"], 0.8)], mask=column(0, 64), face=face),
        dict(name="bob", cond=world["bob_cond"], mask=column(64, 128)),
    ], IMAGE, instantid=models, **{"start_at": 0.0, "layout_replay": False, **options})


class UNetCalls:
    """The engine's UNet calls (the ones it hands a row plan: stage 2's, not stage 1's plain
    ones) while open: inputs, output and the face rows the engine handed to each."""

    def __init__(self, unet, session):
        self.unet, self.session, self.calls = unet, session, []

    def __enter__(self):
        self.handles = [self.unet.register_forward_pre_hook(self._before, with_kwargs=True),
                        self.unet.register_forward_hook(self._after, with_kwargs=True)]
        return self.calls

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def _before(self, module, args, kwargs):
        call = self.session.run.call
        if call is not None:
            self.calls.append(dict(x=args[0].clone(), kwargs={k: v.clone() for k, v in kwargs.items()
                                                               if torch.is_tensor(v)},
                                   rows=call.rows, faces=dict(call.faces)))

    def _after(self, module, args, kwargs, out):
        if self.session.run.call is not None:
            self.calls[-1]["out"] = out.clone()


def blended_call(world, plan, session=None):
    """test_sdxl's A1111-shaped call ([cond rows, uncond rows], batch 2), stage 1 then stage 2 ->
    (blended output, the engine's UNet calls of stage 2)."""
    session = session or MultiConceptSession(world["unet"], plan, context_key=CTX)
    with UNetCalls(world["unet"], session) as calls:
        _, _, out = one_call(world, session)
    return out, calls


# ---- the reference: InstantID as its pipeline runs it, on the face rows alone -------------------

def _sdpa(q, k, v, heads):
    b, n, inner = q.shape
    split = [t.reshape(t.shape[0], -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v)]
    return F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(b, n, inner)


def ip_processors(unet, layers, tokens, scale):
    """IPAttnProcessor's `hidden_states + scale * ip_hidden_states` before to_out, as forward hooks
    adding to_out's linear map of the scaled identity attention."""
    modules = dict(unet.named_modules())
    handles = []
    for name, (wk, wv) in layers.items():
        module = modules[name]

        def hook(m, args, kwargs, out, wk=wk, wv=wv):
            q = m.to_q(args[0])
            extra = scale * _sdpa(q, tokens @ wk.T, tokens @ wv.T, m.heads)
            return out + F.linear(extra, m.to_out[0].weight)
        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    return handles


def controlled_unet(unet, x, timesteps, context, y, control):
    """ldm's ControlledUnetModel.forward: the middle residual after the middle block, residual
    N-1-j on the skip that output block j reads."""
    from sgm.modules.diffusionmodules.util import timestep_embedding
    emb = unet.time_embed(timestep_embedding(timesteps, unet.model_channels, repeat_only=False)) + unet.label_emb(y)
    hs, h = [], x
    for block in unet.input_blocks:
        h = block(h, emb, context)
        hs.append(h)
    h = unet.middle_block(h, emb, context) + control[-1]
    skips = list(control[:-1])
    for block in unet.output_blocks:
        h = block(torch.cat([h, hs.pop() + skips.pop()], dim=1), emb, context)
    return unet.out(h)


def reference_rows(world, call, index=0, weight=0.8, control=0.8):
    face = call["faces"][index]
    rows, kw = face.rows, call["kwargs"]
    x, t, context, y = call["x"][rows], kw["timesteps"][rows], kw["context"][rows], kw["y"][rows]
    merged = merged_copy(world["unet"], [(world["parts"], 0.8)])
    hint = face.hint if face.hint is not None else hint_image(np.full((5, 2), 0.5), IMAGE)[None].expand(len(x), -1, -1, -1)
    residuals = [r * control for r in world["net"](x, t, face.tokens, y, hint)]
    handles = ip_processors(merged, world["ip"].layers, face.tokens, weight)
    try:
        return controlled_unet(merged, x, t, context, y, residuals)
    finally:
        for handle in handles:
            handle.remove()


# ---- tests --------------------------------------------------------------------------------------

def test_a_face_concepts_rows_get_instantid_and_every_other_row_is_untouched(world):
    face = identity(world)
    out_face, calls_face = blended_call(world, plan_for(world, face))
    out_plain, calls_plain = blended_call(world, plan_for(world))
    (call,), (plain,) = calls_face, calls_plain
    alice = call["rows"].find("concept", 0).rows
    others = torch.ones(call["out"].shape[0], dtype=torch.bool)
    others[alice] = False
    assert torch.equal(call["out"][others], plain["out"][others])   # base and bob rows: bit-identical
    # the face rows: cond rows the identity tokens, uncond rows the Resampler over zeros
    tokens = call["faces"][0].tokens
    assert torch.equal(tokens[:2], face.cond_tokens.expand(2, -1, -1))
    assert torch.equal(tokens[2:], face.uncond_tokens.expand(2, -1, -1))
    with torch.no_grad():
        reference = reference_rows(world, call)
    torch.testing.assert_close(call["out"][alice], reference, atol=2e-4, rtol=1e-3)
    assert (call["out"][alice] - plain["out"][alice]).abs().max() > 1e-2   # not vacuous: InstantID acts
    # blended: bob's half of the image is bit-identical, alice's changes
    assert torch.equal(out_face[..., 9:], out_plain[..., 9:])
    assert (out_face[..., :8] - out_plain[..., :8]).abs().max() > 1e-3


@pytest.mark.parametrize("weight, control", [(0.8, 0.0), (0.0, 0.8)])
def test_identity_attention_and_keypoint_control_act_on_their_own(world, weight, control):
    face = identity(world, weight, control)
    _, (call,) = blended_call(world, plan_for(world, face))
    alice = call["rows"].find("concept", 0).rows
    with torch.no_grad():
        reference = reference_rows(world, call, weight=weight, control=control)
        # the other part alone: what the reference gives without it differs (each part is real)
        without = reference_rows(world, call, weight=0.0, control=0.0)
    torch.testing.assert_close(call["out"][alice], reference, atol=2e-4, rtol=1e-3)
    assert (reference - without).abs().max() > 1e-2
    assert (call["faces"][0].hint is None) == (control == 0)


def test_split_calls_under_a_row_cap_give_the_one_call_result(world):
    face = identity(world)
    whole, _ = blended_call(world, plan_for(world, face))
    split, calls = blended_call(world, plan_for(world, face, max_rows_per_call=4))
    assert len(calls) == 3 and sum(1 for c in calls if c["faces"]) == 1
    # other row counts pick other BLAS blockings: float32 rounding, far under InstantID's effect (> 1e-3)
    torch.testing.assert_close(split, whole, atol=1e-4, rtol=1e-4)


def test_faces_go_where_the_layout_has_them_else_in_the_top_of_the_region(world):
    from lib_mc.faces.analysis import Face
    plan = plan_for(world, identity(world))
    # a face in alice's half of the layout (and one in bob's, which alice must not take)
    kps = np.array([[20, 40], [40, 40], [30, 52], [22, 62], [38, 62]], dtype=np.float64)
    theirs = Face(box=np.array([80, 30, 110, 70.0]), kps=kps + [70, 0], score=0.9, embedding=None)
    mine = Face(box=np.array([12, 28, 48, 70.0]), kps=kps, score=0.8, embedding=None)
    placed = place_faces(plan, [[theirs, mine]])
    np.testing.assert_allclose(placed[0][0] * [128, 128], kps)
    default = place_faces(plan)[0][0] * [128, 128]
    assert (default[:, 0] < 64).all() and (default[:, 1] < 64).all()   # alice's column, its upper half
    hint = hint_image(placed[0][0], IMAGE)
    assert hint.shape == (3, 128, 128) and hint[:, 40, 20].sum() > 0.5 and hint[:, 120, 120].sum() == 0


def _sample(world, plan, mode, find_faces=None, steps=4):
    session = make_session(mode, world["unet"], plan, context_key=CTX)
    host = XLCFGHost(world["ldm"], world["cond"], world["uncond"])
    host.route = session.denoise
    from tinyhost import sample
    initial = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    pass_ = HostPass(sample=lambda noise: sample(host, "euler", steps=steps, seed=3), initial=initial,
                     replay_noise=lambda: initial, find_faces=find_faces)
    with torch.no_grad():
        return session.sample(pass_), session


@pytest.mark.parametrize("mode", ["blend", "conductor"])
def test_a_whole_sample_places_the_face_from_the_layout_and_leaves_the_unet_as_it_was(world, mode):
    from lib_mc.faces.analysis import Face
    host = XLCFGHost(world["ldm"], world["cond"], world["uncond"])
    from tinyhost import sample
    with torch.no_grad():
        plain = sample(host, "euler", steps=4, seed=3)
    seen = []

    def find_faces(latents):
        seen.append(latents.shape)
        kps = np.array([[20, 40], [40, 40], [30, 52], [22, 62], [38, 62]], dtype=np.float64)
        return [[Face(box=np.array([12, 28, 48, 70.0]), kps=kps, score=0.9, embedding=None)]]
    start = {"start_at": 0.5} if mode == "conductor" else {"start_at": 0.5}
    with_face, session = _sample(world, plan_for(world, identity(world), **start), mode, find_faces)
    without, _ = _sample(world, plan_for(world, **start), mode)
    assert seen and seen[0][0] == 1   # the layout (blend) or the x0 at the start step (conductor)
    np.testing.assert_allclose(session.plan.face_kps[0][0][0] * 128, [20, 40])
    assert (with_face - without).abs().max() > 1e-3
    assert not [n for n, m in world["unet"].named_modules() if "forward" in m.__dict__]
    with torch.no_grad():
        again = sample(host, "euler", steps=4, seed=3)
    assert torch.equal(again, plain)


def test_forge_routing_gives_the_face_rows_of_the_a1111_path(world):
    from test_forge_routing import PatcherOptions, forge_block_attention, host_attention
    from lib_mc.hosts.forge_routing import install_attention
    face = identity(world)
    _, (a1111,) = blended_call(world, plan_for(world, face))
    session = MultiConceptSession(world["unet"], plan_for(world, face), context_key=CTX, attention_on_modules=False)
    patcher = PatcherOptions()
    install_attention(patcher, session, host_attention)
    with forge_block_attention(world["unet"], patcher):
        _, (forge,) = blended_call(world, None, session)
    torch.testing.assert_close(forge["out"], a1111["out"], atol=1e-5, rtol=1e-4)


def test_the_hires_pass_draws_the_keypoints_at_its_own_size(world):
    plan = plan_for(world, identity(world))
    plan.face_kps = place_faces(plan)
    bigger = plan.at_size((256, 256))
    assert bigger.instantid is plan.instantid and bigger.face_concepts == [0]
    from lib_mc.methods.faces.batch import FaceBatch
    from lib_mc.methods.calls import CallImages
    from lib_mc.rows import RowPlan
    rows = RowPlan()
    rows.add("base", 1, 1)
    rows.add("concept", 1, 1, 0)
    faces = FaceBatch(bigger).rows(rows, CallImages.batched(1, 2), torch.zeros(4, 4, 32, 32))
    assert faces[0].hint.shape == (2, 3, 256, 256) and faces[0].rows == slice(2, 4)
    # each keypoint drawn at its place at this size, in InstantID's colour for it (fixed pixel sizes,
    # as InstantID draws at the generation's size)
    colours = torch.tensor([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]) / 255
    for point, colour in zip(plan.face_kps[0][0] * 256, colours):
        x, y = (int(round(v)) for v in point)
        torch.testing.assert_close(faces[0].hint[0][:, y, x], colour.float(), atol=0.02, rtol=0)
    assert faces[0].hint[0][:, 250, 250].sum() == 0


@pytest.mark.parametrize("negative_tokens", [8, 20])
def test_split_cond_and_uncond_calls_and_a_long_negative_keep_the_face_rows_apart(world, negative_tokens):
    """Batch cond/uncond off, or a negative longer than the prompt (A1111 then calls cond and
    uncond rows apart): in each call the face rows are InstantID's (the uncond call's with the
    negative tokens) and every other row is the run's without the face."""
    from lib_mc.methods.calls import CallImages
    negative = xl_cond(2, tokens=negative_tokens)

    def split_run(plan):
        session = MultiConceptSession(world["unet"], plan, context_key=CTX)
        x = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(5)) * 3
        sigma = torch.full((2,), 3.0)
        calls = [({k: world["cond"][k].expand(2, *world["cond"][k].shape[1:]) for k in world["cond"]},
                  CallImages((0, 1), ())),
                 ({k: negative[k].expand(2, *negative[k].shape[1:]) for k in negative}, CallImages((), (0, 1)))]
        denoiser = CompVisDenoiser(world["ldm"])
        model_fn = lambda xx, ss, cc: denoiser(xx, ss, cond=cc)   # noqa: E731
        with torch.no_grad():
            with session.stage1():
                for cond, images in calls:
                    session.denoise(model_fn, x, sigma, cond, n_cond=len(images.cond), step=0, total_steps=1,
                                    images=images)
            with UNetCalls(world["unet"], session) as seen, session.stage2():
                for cond, images in calls:
                    session.denoise(model_fn, x, sigma, cond, n_cond=len(images.cond), step=0, total_steps=1,
                                    images=images)
        return seen
    face = identity(world)
    faced, plain = split_run(plan_for(world, face)), split_run(plan_for(world))
    assert len(faced) == len(plain) == 2
    for call, without, tokens in zip(faced, plain, (face.cond_tokens, face.uncond_tokens)):
        alice = call["rows"].find("concept", 0).rows
        others = torch.ones(call["out"].shape[0], dtype=torch.bool)
        others[alice] = False
        assert torch.equal(call["out"][others], without["out"][others])
        assert torch.equal(call["faces"][0].tokens, tokens.expand(2, -1, -1))
        with torch.no_grad():
            torch.testing.assert_close(call["out"][alice], reference_rows(world, call), atol=2e-4, rtol=1e-3)
        assert (call["out"][alice] - without["out"][alice]).abs().max() > 1e-2
