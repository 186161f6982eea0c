"""Image-text retrieval: ITC + ITM fine-tuning with image-id-aware positives, ITC-then-ITM ranking."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_prep.batch import normalize
from data_prep.loader import LoaderConfig, ShardLoader
from finetune.metrics.retrieval_recall import random_recall_at_1, retrieval_recall
from finetune.tasks.base import EvalContext
from finetune.tasks.retrieval import (
    OUTSIDE_TOP_K,
    RESULTS_FILE,
    RankedPairs,
    RetrievalSettings,
    RetrievalTask,
    random_ranking_recall,
    retrieval_metrics,
    score_matrix,
    top_k_pairs,
)
from pretrain.launch import free_port
from pretrain.models.factory import build_mplug

IMAGE_SIZE = 64  # the tiny preset's
TEXT_LENGTH = 24  # the tiny preset's data.max_text_length
BATCH = 8
RECALL_KEYS = [f"{d}_r{k}" for d in ("txt", "img") for k in (1, 5, 10)] + ["txt_r_mean", "img_r_mean", "r_mean"]
SIMULATIONS = 4000
OVERFIT_STEPS, OVERFIT_LR, OVERFIT_TAIL, OVERFIT_RATIO = 200, 2e-3, 10, 0.7
ITM_CHANCE = -(math.log(1 / 3) / 3 + 2 * math.log(2 / 3) / 3)  # entropy of 1 positive : 2 negatives


def train_batches(task_shards, tokenizer, seed: int = 0):
    config = LoaderConfig(batch_size=BATCH, image_size=IMAGE_SIZE, augment="finetune", workers=0, seed=seed,
                          pad_to_max=True, max_text_length=TEXT_LENGTH, text_field="txt")
    for batch in ShardLoader(str(task_shards.caption / "train"), config, tokenizer=tokenizer):
        yield {**batch, "images": normalize(batch["images"])}


def unaugmented_train_batches(task_shards, tokenizer):
    """Training batches without augmentation: the same pixels on every pass."""
    config = LoaderConfig(batch_size=BATCH, image_size=IMAGE_SIZE, augment="eval", workers=0, pad_to_max=True,
                          max_text_length=TEXT_LENGTH, text_field="txt")
    for batch in ShardLoader(str(task_shards.caption / "train"), config, tokenizer=tokenizer):
        yield {**batch, "images": normalize(batch["images"])}


def eval_batches(task_shards, tokenizer, rank: int = 0, world_size: int = 1):
    config = LoaderConfig(batch_size=BATCH, image_size=IMAGE_SIZE, mode="epoch", augment="eval", workers=0,
                          max_text_length=TEXT_LENGTH)
    loader = ShardLoader(str(task_shards.caption / "val"), config, tokenizer=tokenizer, rank=rank,
                         world_size=world_size)
    for batch in loader:
        yield {**batch, "images": normalize(batch["images"])}


def make_task(tiny_config, tokenizer, *overrides: str, momentum: bool = True, **settings) -> RetrievalTask:
    torch.manual_seed(0)
    model = build_mplug(tiny_config(*overrides).model, momentum=momentum)
    return RetrievalTask(model, RetrievalSettings(**settings), tokenizer)


def test_settings_default_to_the_reference_recipe():
    settings = RetrievalSettings()
    assert (settings.alpha, settings.k_test, settings.max_text_length) == (0.4, 256, 30)
    assert RetrievalTask.name == "retrieval" and RetrievalTask.metric == "r1_mean"


def test_distillation_without_momentum_copies_is_refused(tiny_config, tokenizer):
    with pytest.raises(ValueError, match="momentum=True or set task.alpha=0"):
        make_task(tiny_config, tokenizer, momentum=False, alpha=0.4)
    assert make_task(tiny_config, tokenizer, momentum=False, alpha=0.0).model.momentum is None


def test_loss_is_itc_plus_itm_and_reaches_both_towers_fusion_and_heads_but_not_the_decoder(
    tiny_config, tokenizer, task_shards
):
    task = make_task(tiny_config, tokenizer)
    batch = next(train_batches(task_shards, tokenizer))
    out = task(batch, step=0)
    assert torch.isfinite(out.loss)
    assert set(out.losses) == {"itc", "itm"}
    assert out.loss.item() == pytest.approx((out.losses["itc"] + out.losses["itm"]).item())
    out.loss.backward()
    model = task.model

    def grad_norm(module: torch.nn.Module) -> float:
        return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)

    for name in ("vision", "text_encoder", "fusion", "vision_proj", "text_proj", "itm_head"):
        assert grad_norm(getattr(model, name)) > 0, f"no gradient reached {name}"
    assert model.temp.grad is not None and model.temp.grad.abs().item() > 0
    assert grad_norm(model.decoder) == 0 and grad_norm(model.mlm_head.head.predictions.transform) == 0
    assert all(p.grad is None for p in model.momentum.parameters())


def test_momentum_features_are_queued_with_their_image_ids(tiny_config, tokenizer, task_shards):
    task = make_task(tiny_config, tokenizer)
    batch = next(train_batches(task_shards, tokenizer))
    task(batch, step=0)
    assert int(task.queue.filled) == BATCH
    assert task.queue.ids[:BATCH].tolist() == batch["image_ids"].tolist()


def test_captions_of_one_image_are_never_itm_negatives_of_each_other(tiny_config, tokenizer, task_shards):
    task = make_task(tiny_config, tokenizer)
    batch = next(train_batches(task_shards, tokenizer))
    same_image = {**batch, "image_ids": torch.full_like(batch["image_ids"], 7)}
    # Every pair shares one image: no sample has a negative left to draw.
    with pytest.raises(ValueError, match="at least one negative"):
        task(same_image, step=0)
    without_ids = {key: value for key, value in same_image.items() if key != "image_ids"}
    assert torch.isfinite(task(without_ids, step=0).loss)


def test_alpha_ramps_linearly_over_its_warmup(tiny_config, tokenizer):
    task = make_task(tiny_config, tokenizer, alpha=0.4, alpha_warmup_steps=10)
    assert [task.alpha(step) for step in (0, 5, 10, 50)] == pytest.approx([0.0, 0.2, 0.4, 0.4])
    assert make_task(tiny_config, tokenizer, alpha=0.4).alpha(0) == 0.4


def test_top_k_pairs_take_each_images_best_texts_and_each_texts_best_images_of_this_rank():
    sim = torch.tensor([[0.9, 0.1, 0.5, 0.0],
                        [0.2, 0.8, 0.3, 0.7],
                        [0.6, 0.4, 0.1, 0.9]])  # (3 images, 4 texts)
    (i2t_images, i2t_texts), (t2i_images, t2i_texts) = top_k_pairs(sim, k_test=2, offset=1, count=2)
    # Images 1 and 2 are this rank's: their two best texts.
    assert list(zip(i2t_images.tolist(), i2t_texts.tolist(), strict=True)) == [(1, 1), (1, 3), (2, 3), (2, 0)]
    # Each text's two best images, of which only images 1 and 2 are scored here.
    # text 0: images 0, 2; text 1: 1, 2; text 2: 0, 1; text 3: 2, 1.
    assert sorted(zip(t2i_images.tolist(), t2i_texts.tolist(), strict=True)) == [(1, 1), (1, 2), (1, 3), (2, 0), (2, 1), (2, 3)]


def test_k_test_larger_than_the_candidates_is_clipped():
    sim = torch.rand(2, 3)
    (i2t_images, _), (t2i_images, _) = top_k_pairs(sim, k_test=256, offset=0, count=2)
    assert i2t_images.numel() == 2 * 3 and t2i_images.numel() == 3 * 2


def test_pairs_outside_the_top_k_rank_behind_every_rescored_pair():
    pairs = RankedPairs(torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([-5.0, 2.0]))
    scores = score_matrix(pairs, num_images=2, num_texts=2)
    assert scores.tolist() == [[OUTSIDE_TOP_K, -5.0], [2.0, OUTSIDE_TOP_K]]
    # Image 0's positive (text 0) was not re-scored: it is missed even though every score is low.
    assert retrieval_recall(scores, [0, 1], ks=(1,))["txt_r1"] == 0.0


def test_baseline_of_two_images_with_two_and_one_captions_is_fifty_percent():
    # Image 0 owns 2 of the 3 captions (R@1 2/3), image 1 owns 1 (1/3): 1/2 on average; text -> image 1/2.
    random = random_ranking_recall([2, 1], ks=(1,))
    assert random["txt_r1"] == pytest.approx(50.0) and random["img_r1"] == pytest.approx(50.0)
    assert random_recall_at_1(2, [0, 0, 1])["r_mean"] == pytest.approx(50.0)


def test_random_recall_at_k_is_the_hypergeometric_miss_probability_hand_checked():
    # Four captions, one per image, K=2: a miss needs both of the 2 first drawn from the 3 others:
    # C(3,2)/C(4,2) = 1/2. Text -> image: 2 of 4 images. K=5 > 4 candidates: always a hit.
    random = random_ranking_recall([1, 1, 1, 1], ks=(2, 5))
    assert random["txt_r2"] == pytest.approx(50.0) and random["img_r2"] == pytest.approx(50.0)
    assert random["txt_r5"] == pytest.approx(100.0) and random["img_r5"] == pytest.approx(100.0)


def test_random_recall_matches_a_simulation_of_random_rankings():
    torch.manual_seed(0)
    texts_per_image = [1, 2, 3, 5, 1, 2, 4, 1, 3, 2, 1, 1]
    text_to_image = [image for image, n in enumerate(texts_per_image) for _ in range(n)]
    trials = [retrieval_recall(torch.rand(len(texts_per_image), len(text_to_image)), text_to_image)
              for _ in range(SIMULATIONS)]
    expected = random_ranking_recall(texts_per_image)
    for key in ("txt_r1", "txt_r5", "img_r5", "r_mean"):
        simulated = sum(trial[key] for trial in trials) / SIMULATIONS
        assert simulated == pytest.approx(expected[key], abs=1.5), key


def test_evaluation_scores_every_image_and_caption_once_and_writes_the_results(
    tiny_config, tokenizer, task_shards, tmp_path
):
    task = make_task(tiny_config, tokenizer).train()
    metrics = task.evaluate(eval_batches(task_shards, tokenizer), EvalContext(output=tmp_path))
    assert task.training  # evaluation leaves the mode as it found it
    for key in RECALL_KEYS + ["r1_mean"] + [f"itc_{key}" for key in RECALL_KEYS]:
        assert 0.0 <= metrics[key] <= 100.0, key
    captions_per_image = [len(meta["captions"]) for batch in eval_batches(task_shards, tokenizer)
                          for meta in batch["meta"]]
    assert metrics["count"] == len(captions_per_image) and metrics["num_texts"] == sum(captions_per_image)
    assert metrics["baseline"] == pytest.approx(100.0 / len(captions_per_image))
    assert metrics["baseline_r_mean"] == pytest.approx(random_ranking_recall(captions_per_image)["r_mean"])
    assert metrics["r1_mean"] == pytest.approx((metrics["txt_r1"] + metrics["img_r1"]) / 2)
    assert json.loads((tmp_path / RESULTS_FILE).read_text())["metrics"] == metrics


def test_with_k_test_one_only_the_itc_top_candidate_can_be_found():
    torch.manual_seed(0)
    text_to_image = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    sim = torch.rand(6, len(text_to_image))  # (I, T) ITC similarities, no ties
    i2t, t2i = top_k_pairs(sim, k_test=1, offset=0, count=6)
    itm_scores = [RankedPairs(*pairs, torch.randn(pairs[0].numel())) for pairs in (i2t, t2i)]
    metrics = retrieval_metrics(sim, *itm_scores, text_to_image)
    # ITM re-scores nothing but the ITC top 1, and every other candidate ties behind it as a miss.
    assert metrics["txt_r1"] == metrics["itc_txt_r1"] == metrics["txt_r10"]
    assert metrics["img_r1"] == metrics["itc_img_r1"] == metrics["img_r5"]


TWO_RANK_EVALUATION = """
import json, sys
from pathlib import Path
import torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from test_task_retrieval import eval_batches
from pretrain.models.weights import load_tokenizer
from finetune.tasks.base import EvalContext
from finetune.tasks.retrieval import RetrievalSettings, RetrievalTask
from pretrain.config import load_config
from pretrain.config.tokens import with_tokenizer
from pretrain.models.factory import build_mplug

work, shards = Path(sys.argv[2]), Path(sys.argv[3])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
tokenizer = load_tokenizer(work / "tokenizer")
model = build_mplug(with_tokenizer(load_config("tiny", []), tokenizer).model, momentum=True)
model.load_state_dict(torch.load(work / "model.pt"))
task = RetrievalTask(model, RetrievalSettings(k_test=3), tokenizer)

class Shards:
    caption = shards

metrics = task.evaluate(eval_batches(Shards, tokenizer, rank, world), EvalContext(work / "out", rank, world))
(work / f"rank{rank}.json").write_text(json.dumps(metrics))
dist.destroy_process_group()
"""


def test_two_ranks_evaluate_to_the_same_metrics_as_one(tiny_config, tokenizer, task_shards, tmp_path):
    task = make_task(tiny_config, tokenizer, k_test=3)
    single = task.evaluate(eval_batches(task_shards, tokenizer), EvalContext(output=tmp_path / "single"))
    torch.save(task.model.state_dict(), tmp_path / "model.pt")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANK_EVALUATION)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), str(script), str(Path(__file__).parent), str(tmp_path), str(task_shards.caption)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank returns rank 0's metrics
    assert ranks[0].keys() == single.keys()
    for key, value in single.items():
        assert ranks[0][key] == pytest.approx(value, abs=1e-6), key


def test_training_on_a_fixed_batch_lowers_the_loss_below_chance(tiny_config, tokenizer, task_shards):
    # A queue of one batch and no distillation (as in the pretraining overfit test): once the queue
    # holds the batch's own features the chance loss is log(2B) for ITC and the 1:2 prior's entropy
    # for ITM. The temperature stays fixed: at this learning rate Adam drives it to temp_min in a
    # few dozen steps, and the ITC loss turns erratic.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same trajectory on every machine
    task = make_task(tiny_config, tokenizer, f"model.queue_size={BATCH}", alpha=0.0)
    batch = next(unaugmented_train_batches(task_shards, tokenizer))
    params = [p for name, p in task.named_parameters() if p.requires_grad and name != "model.temp"]
    optimizer = torch.optim.AdamW(params, lr=OVERFIT_LR, weight_decay=0.0)
    history = []
    for step in range(OVERFIT_STEPS):
        out = task(batch, step=step)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        task.after_optimizer_step()
        history.append(out.loss.item())
    torch.set_num_threads(threads)
    chance = math.log(2 * BATCH) + ITM_CHANCE
    final = statistics.median(history[-OVERFIT_TAIL:])  # ITM draws new negatives every step
    assert final < OVERFIT_RATIO * chance, f"loss {history[0]:.3f} -> {final:.3f}, chance {chance:.3f}"
