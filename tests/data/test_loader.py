"""The resumable training loader: Detectron2's samplers per DATALOADER.SAMPLER_TRAIN, streams
that resume exactly at start_iter, aspect-ratio grouping."""

import collections
import itertools

import pytest

pytest.importorskip("detectron2")

from d2_helpers import make_cfg  # noqa: E402

from afigan.data.loader import ResumableBatches, build_index_sampler  # noqa: E402


def _dataset(n_common=18, n_rare=2):
    """Images 0..n_common-1 hold only category 0; the last n_rare only the rare category 1."""

    def img(i, cat):
        return {
            "file_name": f"{i}.png",
            "image_id": i,
            "height": 100,
            "width": 150 if i % 3 else 80,
            "annotations": [{"category_id": cat, "bbox": [0, 0, 10, 10], "bbox_mode": 1, "iscrowd": 0}],
        }

    return [img(i, 0) for i in range(n_common)] + [img(n_common + i, 1) for i in range(n_rare)]


def _stream(cfg, dataset, start_iter=0, batch=2, grouping=True):
    sampler = build_index_sampler(cfg, dataset, seed=3)
    return ResumableBatches(
        dataset, lambda d: d["image_id"], sampler, batch, seed=3, aspect_ratio_grouping=grouping, start_iter=start_iter
    )


def test_repeat_factor_sampler_is_honoured():
    data = _dataset()
    plain = collections.Counter(i for b in itertools.islice(_stream(make_cfg(), data).index_batches(), 2000) for i in b)
    cfg = make_cfg(None, "DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler", "DATALOADER.REPEAT_THRESHOLD", 0.5)
    rfs = collections.Counter(i for b in itertools.islice(_stream(cfg, data).index_batches(), 2000) for i in b)
    share = lambda c: (c[18] + c[19]) / sum(c.values())  # noqa: E731
    # Uniform: 2 of 20 images. Repeat factors (threshold 0.5, sqrt): rare category frequency 0.1 -> r = sqrt(5) ~ 2.24,
    # common 0.9 -> 1: expected share 2 * 2.24 / (18 + 2 * 2.24) ~ 0.199.
    assert abs(share(plain) - 0.1) < 0.02
    assert abs(share(rfs) - 2 * 5**0.5 / (18 + 2 * 5**0.5)) < 0.02


@pytest.mark.parametrize("sampler", ["TrainingSampler", "RepeatFactorTrainingSampler", "RandomSubsetTrainingSampler"])
def test_stream_resumes_exactly_at_start_iter(sampler):
    cfg = make_cfg(
        None,
        "DATALOADER.SAMPLER_TRAIN",
        sampler,
        "DATALOADER.REPEAT_THRESHOLD",
        0.5,
        "DATALOADER.RANDOM_SUBSET_RATIO",
        0.5,
    )
    data = _dataset()
    full = list(itertools.islice(iter(_stream(cfg, data)), 40))
    resumed = list(itertools.islice(iter(_stream(cfg, data, start_iter=25)), 15))
    assert resumed == full[25:]
    other_seed = ResumableBatches(data, lambda d: d["image_id"], build_index_sampler(cfg, data, seed=4), 2, seed=4)
    assert list(itertools.islice(iter(other_seed), 40)) != full


def test_aspect_ratio_grouping_batches_one_orientation():
    data = _dataset()
    for batch in itertools.islice(_stream(make_cfg(), data, batch=3).index_batches(), 50):
        assert len({data[i]["height"] > data[i]["width"] for i in batch}) == 1


def test_unknown_sampler_is_one_sentence():
    with pytest.raises(ValueError, match=r"DATALOADER.SAMPLER_TRAIN must be one of .*'TrainingSampler'.*got 'Uniform'"):
        build_index_sampler(make_cfg(None, "DATALOADER.SAMPLER_TRAIN", "Uniform"), _dataset(), seed=0)
