"""train_bpe's contract on its input: strings in a list or tuple are file paths, texts come in any other iterable.
A list of texts is refused in one line saying how to pass them (it was an OSError quoting the whole document when a
text was longer than a file name may be); a directory and a stream of paths are named too."""

import pytest

from lmforge.errors import DataError
from lmforge.tokenizer.train import train_bpe

HOW = r"strings in a list are file paths; pass texts as an iterator, e.g. iter\(texts\)\)$"
DOCS = ["the cat sat on the mat. " * 20 + "\n" + "a dog ran. " * 30, "x" * 5000, "nul \x00 inside"]


@pytest.mark.parametrize("text", DOCS, ids=["long-document", "longer-than-a-name", "nul"])
def test_a_list_of_texts_is_refused_in_one_line_saying_how_to_pass_them(text):
    with pytest.raises(DataError, match=HOW) as e:
        train_bpe([text], 260, progress=False)
    message = str(e.value)
    assert message.startswith(f"training input not found: {text[:80]!r} ")
    assert len(message) < 300  # the text is quoted, never whole


def test_the_same_texts_train_through_an_iterator_as_from_a_file(tmp_path):
    text = DOCS[0]
    (tmp_path / "doc.txt").write_text(text)
    from_texts = train_bpe(iter([text]), 270, progress=False)
    from_file = train_bpe([tmp_path / "doc.txt"], 270, progress=False)
    assert from_texts.merges == from_file.merges and len(from_texts.merges) == 270 - 256
    assert from_texts.decode(from_texts.encode(text)) == text


def test_a_directory_and_a_stream_of_paths_are_named(tmp_path):
    (tmp_path / "a.txt").write_text("some text")
    with pytest.raises(DataError, match=r"is a directory: pass the files in it, e.g. sorted\(Path\("):
        train_bpe([tmp_path], 260, progress=False)
    with pytest.raises(DataError, match=r"got PosixPath \(file paths go in a list or tuple: train_bpe\(\[path"):
        train_bpe(iter([tmp_path / "a.txt"]), 260, progress=False)
