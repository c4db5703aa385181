import torch

from ditplan.models.adapters import load_adapter
from ditplan.models.digits import load_digits
from ditplan.models.train_embedded import TrainConfig, export_embedded, train_embedded


def test_digits_split_is_fixed_stratified_and_disjoint():
    train, train_labels = load_digits("train")
    held, held_labels = load_digits("held_out")
    assert train.shape == (4000, 1, 32, 32) and held.shape == (1000, 1, 32, 32)
    assert torch.bincount(held_labels).tolist() == [100] * 10
    assert train.min() == -1 and train.max() == 1
    assert torch.equal(load_digits("held_out")[0], held)


def test_training_resumes_from_its_checkpoint_and_exports_loadable_weights(tmp_path):
    config = TrainConfig.make(steps=4, batch_size=4, save_every=2)
    assert train_embedded(tmp_path / "a", TrainConfig.make(steps=2, batch_size=4, save_every=2)) == 2
    assert train_embedded(tmp_path / "a", config) == 4  # resumed: continues from step 2
    assert train_embedded(tmp_path / "b", config) == 4  # uninterrupted
    export_embedded(tmp_path / "a", tmp_path / "ea")
    export_embedded(tmp_path / "b", tmp_path / "eb")
    resumed, straight = load_adapter("dit", str(tmp_path / "ea")), load_adapter("dit", str(tmp_path / "eb"))
    for (name, p), q in zip(resumed.transformer.state_dict().items(), straight.transformer.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)
    assert resumed.scheduler_config["prediction_type"] == "v_prediction"


def test_the_shipped_model_loads_through_from_pretrained(embedded_adapter):
    assert embedded_adapter.num_layers == 6 and embedded_adapter.num_tokens == 256
    assert sum(p.numel() for p in embedded_adapter.transformer.parameters()) == 2_120_068
