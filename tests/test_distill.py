"""Recovery training (Recover): distillation, LoRA, masks kept, resume, teacher cache, refusals."""

import copy

import pytest
import torch
import transformers as tf

import secateurs as sc
from secateurs.data import doc_paragraphs, self_generated_batches, split_held_out, with_labels
from secateurs.errors import CheckpointError, RecoveryError
from secateurs.passes import (
    PassManager,
    Recover,
    RecoverOptions,
    attach_lora,
    check_nm,
    layer_map_from_depth,
    remove_masks,
)
from secateurs.passes.depth import DepthRecord
from secateurs.progress import reporting

SEQ = 48


class Corpus:
    """Python's documentation as characters, split into train / held-out (early stopping) / test parts."""

    def __init__(self):
        text = "\n".join(doc_paragraphs(400))
        self.vocab = sorted(set(text))
        index = {c: i for i, c in enumerate(self.vocab)}
        ids = torch.tensor([index[c] for c in text])
        cut = int(len(ids) * 0.8)
        self.train, rest = ids[:cut], ids[cut:]
        self.held, self.test = rest[: len(rest) // 2], rest[len(rest) // 2:]

    @staticmethod
    def windows(src, count, gen):
        starts = torch.randint(0, len(src) - SEQ, (count,), generator=gen)
        return torch.stack([src[s:s + SEQ] for s in starts])

    def batches(self, src, n, size, seed):
        gen = torch.Generator().manual_seed(seed)
        return [{"input_ids": b, "labels": b} for b in (self.windows(src, size, gen) for _ in range(n))]


@pytest.fixture(scope="module")
def lm():
    """A tiny Llama (4 query heads per KV head, so 25% head pruning removes one) trained briefly."""
    corpus = Corpus()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(corpus.vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=SEQ,
                         tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        b = corpus.windows(corpus.train, 16, gen)
        loss = model(input_ids=b, labels=b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), corpus


def perplexity(model, batches):
    with torch.no_grad():
        return float(torch.exp(torch.stack([model(**b).loss for b in batches]).mean()))


@pytest.fixture(scope="module")
def _pruned(lm):
    model, corpus = lm
    student = copy.deepcopy(model)
    example = {"input_ids": corpus.test[:SEQ].unsqueeze(0)}
    sc.prune(student, example, ffn=0.4, heads=0.25, round_to=1)
    return student, example


@pytest.fixture
def pruned(_pruned):
    """A fresh copy of the tiny LM after 40% FFN and 25% head pruning, with its example inputs."""
    return copy.deepcopy(_pruned[0]), _pruned[1]


@pytest.fixture(scope="module")
def _sparse(lm):
    model, corpus = lm
    student = copy.deepcopy(model)
    sc.prune(student, {"input_ids": corpus.test[:SEQ].unsqueeze(0)}, nm="2:4")
    assert hasattr(student.model.layers[0].mlp.up_proj, "weight_mask")
    return student


@pytest.fixture
def sparse24(_sparse):
    """A fresh copy of the tiny LM with 2:4 masks attached to every linear layer but the head."""
    return copy.deepcopy(_sparse)


def test_recovery_lowers_the_training_loss_and_keeps_the_best_held_out_weights(lm, pruned):
    """Recovery minimises its objective on the training batches; held-out data only picks the weights kept.

    The pruned student is only ~2% worse than this weak teacher on held-out text, so whether 10 steps lower the
    held-out perplexity depended on the processor's rounding (18.04 -> 18.53 on one machine, 18.15 -> 17.76 on
    another). What holds: 30 Adam steps cycling over 10 fixed batches lower the objective on those batches (the
    third pass over them against the first: measured -3.4%, asserted -1%; the curve is read, not the kept
    weights, which early stopping may take from an earlier step), and the weights kept are those of the best
    held-out evaluation, step 0 included, so the kept held-out loss is never above the pruned model's.
    """
    dense, corpus = lm
    student, example = pruned
    assert student.model.layers[0].self_attn.q_proj.out_features == 48  # one head of four per group removed
    assert student.model.layers[0].mlp.up_proj.out_features == 77  # 40% of 128 FFN neurons removed
    train = corpus.batches(corpus.train, 10, 8, seed=2)
    held = corpus.batches(corpus.held, 1, 16, seed=3)
    shapes = {n: p.shape for n, p in student.named_parameters()}
    graph = sc.capture(student, example)
    options = RecoverOptions(steps=30, lr=3e-3, eval_every=5)
    result = PassManager([Recover(dense, train, eval_data=held, options=options)])(graph)
    record = result.results[0][1].record
    losses = {p.step: p.train_loss for p in record.curve if p.train_loss is not None}
    first, third = (sum(losses[s] for s in range(k, k + 10)) / 10 for k in (1, 21))
    assert third < 0.99 * first, (first, third)
    assert {n: p.shape for n, p in student.named_parameters()} == shapes
    assert record.steps == 30 and record.mode == "full" and record.objective == "0.5*kl(T=2) + 0.5*task"
    evals = record.evaluations
    assert [p.step for p in evals] == [0, 5, 10, 15, 20, 25, 30]
    best = min(evals, key=lambda p: p.eval_loss)
    assert record.best_step == best.step and best.eval_loss <= evals[0].eval_loss
    assert perplexity(student, held) == pytest.approx(best.perplexity, rel=1e-4)  # the best weights were kept
    assert all(p.perplexity == pytest.approx(torch.tensor(p.eval_loss).exp().item()) for p in evals)
    assert not student.training and all(p.requires_grad for p in student.parameters())


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_two_four_masks_hold_after_recovery(lm, sparse24, mode):
    dense, corpus = lm
    student = sparse24
    before = {n: t.detach().clone() for n, t in student.named_parameters()}
    record = Recover(dense, corpus.batches(corpus.train, 4, 8, seed=4),
                     options=RecoverOptions(steps=4, lr=1e-2, mode=mode)).run(sc.capture(student, {
                         "input_ids": corpus.test[:SEQ].unsqueeze(0)})).record
    assert check_nm(student, 2, 4, ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"]) == []
    assert check_nm(student, 2, 4, [n for n, m in student.named_modules()
                                    if isinstance(m, torch.nn.Linear) and n != "lm_head"]) == []
    after = dict(student.named_parameters())
    assert after.keys() == before.keys()  # adapters merged away, masks still attached
    w = "model.layers.0.mlp.up_proj.weight_orig"
    assert not torch.equal(before[w], after[w])
    assert record.mode == ("full" if mode == "full" else "lora/native")
    remove_masks(student)
    assert check_nm(student, 2, 4, ["model.layers.0.mlp.up_proj"]) == []


def test_zeros_without_masks_are_kept(lm, sparse24):
    dense, corpus = lm
    student = sparse24
    remove_masks(student)  # zeros stay, masks gone (SparsifyWeights(keep_masks=False) leaves the same)
    Recover(dense, corpus.batches(corpus.train, 2, 8, seed=5), options=RecoverOptions(steps=2, lr=1e-2)).run(
        sc.capture(student, {"input_ids": corpus.test[:SEQ].unsqueeze(0)}))
    assert check_nm(student, 2, 4, ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj"]) == []
    assert not hasattr(student.model.layers[0].mlp.up_proj, "weight_mask")


@pytest.mark.parametrize("backend,masked", [("peft", False), ("native", False), ("native", True)])
def test_lora_merge_equals_unmerged_adapters(lm, sparse24, backend, masked):
    if backend == "peft":
        pytest.importorskip("peft")
    dense, corpus = lm
    model = sparse24 if masked else copy.deepcopy(dense)
    names = [n for n, _ in model.named_parameters()]
    x = corpus.test[:SEQ].reshape(1, -1)
    adapters = attach_lora(model, rank=4, backend=backend)
    assert adapters.backend == backend and "lm_head" not in adapters.layers
    torch.manual_seed(1)
    with torch.no_grad():
        for p in adapters.parameters():
            p.add_(0.05 * torch.randn_like(p))  # B starts at zero: make the update non-trivial
        unmerged = model(input_ids=x).logits
    adapters.merge()
    with torch.no_grad():
        merged = model(input_ids=x).logits
    assert not torch.allclose(merged, dense(input_ids=x).logits, atol=1e-3)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    assert [n for n, _ in model.named_parameters()] == names
    if masked:
        assert check_nm(model, 2, 4, ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]) == []


def test_peft_refuses_masked_layers(sparse24):
    pytest.importorskip("peft")
    with pytest.raises(RecoveryError, match="native"):
        attach_lora(sparse24, backend="peft")


def _interrupt_after(count):
    def render(iterable, desc, total):
        for i, item in enumerate(iterable):
            if desc == "recover" and i == count:
                raise KeyboardInterrupt
            yield item

    return render


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resume_continues_the_same_loss_curve(lm, pruned, tmp_path, mode):
    dense, corpus = lm
    student, example = pruned
    data = corpus.batches(corpus.train, 3, 4, seed=6)
    held = corpus.batches(corpus.held, 1, 8, seed=7)

    def run(model, folder, resume=False):
        options = RecoverOptions(steps=4, lr=3e-3, mode=mode, eval_every=2, checkpoint_dir=str(folder),
                                 checkpoint_every=2, resume=resume, seed=3)
        return Recover(dense, data, eval_data=held, options=options).run(sc.capture(model, example)).record

    whole = copy.deepcopy(student)
    reference = run(whole, tmp_path / "a")
    broken = copy.deepcopy(student)
    with reporting(_interrupt_after(3)), pytest.raises(KeyboardInterrupt):
        run(broken, tmp_path / "b")
    assert (tmp_path / "b" / "step-00000002" / "state.safetensors").exists()
    assert not list((tmp_path / "b").rglob("*.pt")) and not list((tmp_path / "b").rglob("*.bin"))
    resumed_model = copy.deepcopy(student)
    resumed = run(resumed_model, tmp_path / "b", resume=True)
    assert resumed.resumed_from == 2 and resumed.steps == 4
    assert [dataclass_tuple(p) for p in resumed.curve] == [dataclass_tuple(p) for p in reference.curve]
    for (n, a), (_, b) in zip(whole.state_dict().items(), resumed_model.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=n)
    with pytest.raises(CheckpointError, match="mode"):
        other = "lora" if mode == "full" else "full"
        Recover(dense, data, options=RecoverOptions(steps=4, mode=other, checkpoint_dir=str(tmp_path / "b"),
                                                    resume=True)).run(sc.capture(copy.deepcopy(student), example))


def dataclass_tuple(point):
    return (point.step, point.train_loss, point.eval_loss, point.perplexity)


def test_teacher_cache_gives_the_live_teacher_curve_and_then_needs_no_teacher(lm, pruned, tmp_path):
    dense, corpus = lm
    student, example = pruned
    data = [{"input_ids": b["input_ids"]} for b in corpus.batches(corpus.train, 2, 4, seed=8)]  # no labels: pure KD
    held = [{"input_ids": b["input_ids"]} for b in corpus.batches(corpus.held, 1, 4, seed=9)]
    options = RecoverOptions(steps=3, lr=3e-3, hidden_weight=0.5, eval_every=3)
    live = Recover(dense, data, eval_data=held, options=options).run(sc.capture(copy.deepcopy(student), example))
    cached_options = RecoverOptions(steps=3, lr=3e-3, hidden_weight=0.5, eval_every=3, cache_teacher=True,
                                    cache_dir=str(tmp_path / "teacher"))
    first = Recover(dense, data, eval_data=held, options=cached_options).run(
        sc.capture(copy.deepcopy(student), example))
    assert sorted(p.name for p in (tmp_path / "teacher").iterdir()) == [
        "eval-00000.safetensors", "manifest.json", "train-00000.safetensors"]
    again = Recover(None, data, eval_data=held, options=cached_options).run(
        sc.capture(copy.deepcopy(student), example))
    assert live.record.objective == "1*kl(T=2) + 0.5*hidden"
    for a, b, c in zip(live.record.curve, first.record.curve, again.record.curve, strict=True):
        assert a.train_loss == pytest.approx(b.train_loss, abs=1e-6) and b.train_loss == c.train_loss
    assert live.record.curve[-1].perplexity is None  # the held-out loss is the distillation objective
    with pytest.raises(RecoveryError, match="other data"):
        Recover(None, data[:1], options=cached_options).run(sc.capture(copy.deepcopy(student), example))


def test_layer_map_from_depth_records():
    first = DepthRecord("bi", (("model.layers.1", 0.1),), ())
    second = DepthRecord("bi", (("model.layers.2", 0.2), ("model.layers.0", 0.3)), ())
    assert layer_map_from_depth([first], 6) == (0, 2, 3, 4, 5)
    assert layer_map_from_depth([first, second], 6) == (2, 4, 5)
    with pytest.raises(RecoveryError):
        layer_map_from_depth([DepthRecord("bi", (("model.layers.9", 0.1),), ())], 4)


def test_self_generated_batches_are_seeded_and_train(lm, pruned):
    dense, corpus = lm
    a = self_generated_batches(dense, None, n=3, seq_len=12, seed=5, batch_size=2)
    b = self_generated_batches(dense, None, n=3, seq_len=12, seed=5, batch_size=2)
    assert [t["input_ids"].shape for t in a] == [(2, 12), (1, 12)]
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert not torch.equal(a[0]["input_ids"], self_generated_batches(dense, None, 3, 12, seed=6)[0]["input_ids"][:2])
    student, example = pruned
    result = Recover(dense, a, options=RecoverOptions(steps=2)).run(sc.capture(student, example))
    assert result.modified and result.record.steps == 2


def test_data_helpers():
    train, held = split_held_out(list(range(10)), 0.2)
    assert (train, held) == (list(range(8)), [8, 9])
    batch = with_labels([{"input_ids": torch.tensor([[5, 6, 0]]), "attention_mask": torch.tensor([[1, 1, 0]])}])
    assert batch[0]["labels"].tolist() == [[5, 6, -100]]


def test_refusals(lm, pruned):
    dense, corpus = lm
    student, example = pruned
    data = corpus.batches(corpus.train, 1, 2, seed=10)
    with pytest.raises(RecoveryError, match="empty"):
        Recover(dense, [])
    with pytest.raises(RecoveryError, match="mode"):
        RecoverOptions(mode="qlora")
    with pytest.raises(RecoveryError, match="steps"):
        RecoverOptions(steps=-1)
    with pytest.raises(RecoveryError, match="eval_data"):
        Recover(dense, data, options=RecoverOptions(patience=2))
    with pytest.raises(RecoveryError, match="teacher"):
        Recover(None, data, options=RecoverOptions(steps=1)).run(sc.capture(student, example))
    cfg = copy.deepcopy(dense.config)
    cfg.vocab_size += 5
    other = tf.LlamaForCausalLM(cfg).eval()
    before = {n: t.clone() for n, t in student.state_dict().items()}
    v = len(corpus.vocab)
    with pytest.raises(RecoveryError, match=rf"teacher's output \(2, 48, {v + 5}\) does not match the student's "
                                            rf"\(2, 48, {v}\)"):
        Recover(other, data, options=RecoverOptions(steps=1)).run(sc.capture(student, example))
    assert all(torch.equal(before[n], t) for n, t in student.state_dict().items())


def test_zero_steps_is_a_no_op(lm, pruned):
    dense, corpus = lm
    student, example = pruned
    before = {n: t.clone() for n, t in student.state_dict().items()}
    graph = sc.capture(student, example)
    result = Recover(dense, corpus.batches(corpus.train, 1, 2, seed=11), options=RecoverOptions(steps=0)).run(graph)
    assert result.modified is False and result.graph is graph and result.record.steps == 0
    assert all(torch.equal(before[n], t) for n, t in student.state_dict().items())


def test_early_stopping_keeps_the_best_weights(lm, pruned):
    dense, corpus = lm
    student, example = pruned
    before = {n: t.clone() for n, t in student.state_dict().items()}
    options = RecoverOptions(steps=6, lr=0.5, accumulate=2, eval_every=1, patience=2, max_grad_norm=None)
    record = Recover(dense, corpus.batches(corpus.train, 2, 4, seed=12), eval_data=corpus.batches(
        corpus.held, 1, 8, seed=13), options=options).run(sc.capture(student, example)).record
    assert record.stopped_early and record.steps == 2 and record.best_step == 0  # lr 0.5 only makes it worse
    assert all(torch.equal(before[n], t) for n, t in student.state_dict().items())


class Mlp(torch.nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, hidden), torch.nn.Linear(hidden, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_plain_module_with_tuple_batches_and_a_custom_task_loss():
    torch.manual_seed(0)
    teacher = Mlp().eval()
    x = torch.randn(64, 8)
    student = copy.deepcopy(teacher)
    sc.prune(student, (x[:2],), ratio=0.5, round_to=1)
    assert student.fc1.out_features == 16
    data = [(x[i:i + 16],) for i in range(0, 64, 16)]
    y = teacher(x).argmax(-1)

    def task(out, batch):
        (inputs,) = batch
        return torch.nn.functional.cross_entropy(out, teacher(inputs).argmax(-1))

    def error():
        with torch.no_grad():
            return float((student(x) - teacher(x)).pow(2).mean())

    start = error()
    record = Recover(teacher, data, loss_fn=task, options=RecoverOptions(steps=20, lr=1e-2, alpha=0.9)).run(
        sc.capture(student, (x[:2],))).record
    assert record.objective == "0.9*nmse + 0.1*task"  # a plain tensor output is matched by normalised MSE
    assert error() < start and y.shape == (64,)
    with pytest.raises(RecoveryError, match="hidden states"):
        Recover(teacher, data, options=RecoverOptions(steps=1, hidden_weight=1.0)).run(sc.capture(student, (x[:2],)))


def test_top_k_teacher_cache_is_smaller_and_exact_at_full_vocabulary(lm, pruned, tmp_path):
    """Top-k logits: k = vocabulary gives the full cache's curve; a small k shrinks the cache and still trains."""
    dense, corpus = lm
    student, example = pruned
    vocab = len(corpus.vocab)
    data = [{"input_ids": b["input_ids"]} for b in corpus.batches(corpus.train, 3, 4, seed=8)]
    held = [{"input_ids": b["input_ids"]} for b in corpus.batches(corpus.held, 1, 4, seed=9)]
    curves, sizes = {}, {}
    for k in (None, vocab, 8):
        folder = tmp_path / f"teacher-{k}"
        options = RecoverOptions(steps=6, lr=3e-3, eval_every=6, cache_teacher=True, cache_dir=str(folder),
                                 cache_top_k=k)
        out = Recover(dense, data, eval_data=held, options=options).run(sc.capture(copy.deepcopy(student), example))
        curves[k] = out.record.curve
        sizes[k] = sum(p.stat().st_size for p in folder.glob("train-*.safetensors"))
    for a, b in zip(curves[None], curves[vocab], strict=True):
        for got, want in ((a.train_loss, b.train_loss), (a.eval_loss, b.eval_loss)):
            assert (got is None) == (want is None)
            assert got is None or got == pytest.approx(want, rel=1e-5, abs=1e-6)
    evals = [p for p in curves[8] if p.eval_loss is not None]
    assert evals[-1].eval_loss < evals[0].eval_loss  # sparse distillation still lowers the (top-k) objective
    # values float32 + ids int32 for 8 of the vocabulary's logits
    assert sizes[8] < sizes[None] * (2 * 8 / vocab) * 1.2
    with pytest.raises(RecoveryError, match="cache_top_k needs cache_teacher"):
        RecoverOptions(cache_top_k=8)
    with pytest.raises(RecoveryError, match="cache_top_k"):
        RecoverOptions(cache_teacher=True, cache_dir=str(tmp_path), cache_top_k=0)


class _LazyBatches(torch.utils.data.Dataset):
    """A map-style dataset that builds each batch on access and counts the accesses."""

    def __init__(self, batches):
        self.batches, self.reads = batches, 0

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        if not 0 <= i < len(self.batches):
            raise IndexError(i)
        self.reads += 1
        return {k: v.clone() for k, v in self.batches[i].items()}


def test_map_style_datasets_are_read_lazily_with_the_same_curve(lm, pruned):
    dense, corpus = lm
    student, example = pruned
    batches = corpus.batches(corpus.train, 4, 4, seed=12)
    held = corpus.batches(corpus.held, 1, 4, seed=13)
    options = RecoverOptions(steps=4, lr=3e-3, eval_every=2)
    listed = Recover(dense, batches, eval_data=held, options=options).run(sc.capture(copy.deepcopy(student), example))
    lazy = _LazyBatches(batches)
    recover = Recover(dense, lazy, eval_data=_LazyBatches(held), options=options)
    assert recover.data is lazy and lazy.reads == 0  # not copied into a list
    out = recover.run(sc.capture(copy.deepcopy(student), example))
    assert lazy.reads > 0
    assert [p.train_loss for p in out.record.curve] == [p.train_loss for p in listed.record.curve]
    assert [p.eval_loss for p in out.record.curve] == [p.eval_loss for p in listed.record.curve]


def test_an_iterable_dataset_with_a_length_is_read_into_a_list(lm, pruned):
    dense, corpus = lm
    student, example = pruned
    batches = corpus.batches(corpus.train, 2, 4, seed=12)

    class Stream(torch.utils.data.IterableDataset):
        def __len__(self):
            return len(batches)

        def __iter__(self):
            return iter(batches)

    recover = Recover(dense, Stream(), options=RecoverOptions(steps=2, lr=3e-3))
    assert isinstance(recover.data, list) and len(recover.data) == 2
    assert recover.run(sc.capture(copy.deepcopy(student), example)).record.steps == 2


def test_bf16_autocast_trains_on_cpu_and_keeps_float32_weights(lm, sparse24):
    dense, corpus = lm
    student = sparse24
    example = {"input_ids": corpus.test[:SEQ].unsqueeze(0)}
    # The 2:4 student is already about as good as this weak teacher on held-out text, so only the loss on the
    # batches it trains on must fall (24 steps: measured -11%, asserted -5%).
    train = corpus.batches(corpus.train, 8, 8, seed=15)
    before = perplexity(student, train)
    options = RecoverOptions(steps=24, lr=3e-3, bf16=True)
    Recover(dense, train, options=options).run(sc.capture(student, example))
    assert perplexity(student, train) < 0.95 * before
    assert all(p.dtype == torch.float32 for p in student.parameters())
    names = [n for n, m in student.named_modules() if hasattr(m, "weight_mask")]
    assert names and check_nm(student, 2, 4, names) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (tools/gpu_check.sh runs it on one)")
def test_bf16_recovery_on_cuda_lowers_perplexity_and_returns_the_model_to_the_cpu(lm, sparse24):
    dense, corpus = lm
    student = sparse24
    example = {"input_ids": corpus.test[:SEQ].unsqueeze(0)}
    train = corpus.batches(corpus.train, 8, 8, seed=17)
    before = perplexity(student, train)
    options = RecoverOptions(steps=24, lr=3e-3, bf16=True, device="cuda", mode="lora")
    record = Recover(dense, train, options=options).run(sc.capture(student, example)).record
    assert record.steps == 24
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in student.parameters())
    assert next(dense.parameters()).device.type == "cpu"
    assert perplexity(student, train) < before  # the loss it minimises, on its own batches
    names = [n for n, m in student.named_modules() if hasattr(m, "weight_mask")]
    assert check_nm(student, 2, 4, names) == []
