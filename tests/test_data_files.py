"""The bundled data files are the published ones: their checksums match data/README.md."""
import hashlib
import re

from tests.helpers import ROOT

DATA = ROOT / "data"


def _listed_checksums():
    text = (DATA / "README.md").read_text()
    return dict((path, md5) for md5, path in re.findall(r"^\s+([0-9a-f]{32})\s+(\S+)$", text, re.M))


def test_readme_lists_every_bundled_data_file_the_product_reads():
    listed = _listed_checksums()
    assert set(listed) == {"ml-100k/u.data", "ml-100k/u.item", "ml-100k/u.user", "amazon-beauty/Beauty.txt"}


def test_bundled_files_match_their_checksums():
    for path, md5 in _listed_checksums().items():
        digest = hashlib.md5((DATA / path).read_bytes()).hexdigest()
        assert digest == md5, f"data/{path}: md5 {digest}, README says {md5}"


def test_movielens_terms_of_use_ship_with_the_data():
    assert "MovieLens" in (DATA / "ml-100k" / "README").read_text(encoding="latin-1")
