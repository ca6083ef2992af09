"""Feature tables -> feat_* columns (p5ray/features.py): no Ray."""

from pathlib import Path

from p5ray.ingest import features

DATA = Path(__file__).parent.parent / "data" / "ml-100k"
FIXTURES = Path(__file__).parent / "fixtures" / "prepare"


def test_movielens_side_files_are_found_beside_u_data():
    assert features.movielens_side_files(str(DATA / "u.data")) == (DATA / "u.user", DATA / "u.item")
    assert features.movielens_side_files(str(FIXTURES / "messy.csv")) == (None, None)


def test_ml100k_user_features():
    table = features.read_table(DATA / "u.user", "user")
    cols, entries = features.encode(table, ["1", "2", "nobody"])
    assert entries["age"]["values"] == features.AGE_BUCKETS and entries["age"]["cardinality"] == 8
    assert entries["gender"] == {
        "kind": "categorical",
        "column": "feat_gender",
        "cardinality": 3,
        "values": ["F", "M"],
    }
    assert entries["occupation"]["cardinality"] == 22
    # user 1: 24, M, technician, 85711; user 2: 53, F, other, 94043
    assert cols["feat_age"].to_pylist() == [2, 6, 0]
    assert cols["feat_gender"].to_pylist() == [2, 1, 0]
    assert cols["feat_zip"].to_pylist()[:2] == [
        entries["zip"]["values"].index("8") + 1,
        entries["zip"]["values"].index("9") + 1,
    ]


def test_ml100k_item_features_are_latin1_safe_and_multi_valued():
    table = features.read_table(DATA / "u.item", "item")
    assert table.skipped_rows == 0 and len(table.values["genres"]) == 1682
    cols, entries = features.encode(table, ["1", "2"])
    assert (
        entries["genres"]["kind"] == "multi_categorical" and entries["genres"]["cardinality"] == 20
    )
    genres = entries["genres"]["values"]
    # Toy Story: Animation, Children's, Comedy; GoldenEye: Action, Adventure, Thriller
    assert [[genres[i - 1] for i in row] for row in cols["feat_genres"].to_pylist()] == [
        ["Animation", "Children's", "Comedy"],
        ["Action", "Adventure", "Thriller"],
    ]
    assert entries["year"]["values"][cols["feat_year"].to_pylist()[0] - 1] == "1990s"


def test_generic_table_and_previous_values_keep_their_numbers():
    table = features.read_table(FIXTURES / "item_features.csv", "item")
    cols, entries = features.encode(
        table, ["i9", "i1", "i7"], previous={"brand": {"values": ["zeta", "old"]}}
    )
    assert entries["brand"]["values"] == ["zeta", "old", "acme"]
    assert cols["feat_brand"].to_pylist() == [1, 3, 0]
    assert entries["price"]["values"] == ["1.5", "2", "3"]
    assert cols["feat_price"].to_pylist() == [3, 1, 0]
