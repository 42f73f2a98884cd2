"""Yes/no readout: batched equals one-by-one, logsumexp over variants, single-token checks."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, QUESTIONS, make_image
from mechmed.errors import MechmedError
from mechmed.readout import answer_token_ids, build_inputs, margins


@pytest.mark.parametrize("name", FAMILIES)
def test_batched_margins_equal_one_by_one(tiny_bundles, name):
    b = tiny_bundles[name]
    images = [make_image(i) for i in range(len(QUESTIONS))] if b.multimodal else None
    batched = margins(b, QUESTIONS, images, batch_size=len(QUESTIONS))
    single = torch.cat([margins(b, [q], None if images is None else [im])
                        for q, im in zip(QUESTIONS, images or [None] * len(QUESTIONS))])
    # left padding + attention mask: same numbers up to float32 reduction order
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_margin_is_logsumexp_difference_at_last_position(tiny_bundles):
    b = tiny_bundles["Gemma3ForConditionalGeneration"]
    images = [make_image(7)]
    inputs = build_inputs(b.processor, QUESTIONS[:1], images)
    assert inputs["input_ids"][0, 0].item() == b.tokenizer.bos_token_id  # one <bos>, not two
    assert (inputs["input_ids"][0] == b.tokenizer.bos_token_id).sum() == 1
    with torch.no_grad():
        full = b.model(**inputs).logits[0, -1]
    yes = torch.logsumexp(full[list(b.answers.yes_ids)], 0)
    no = torch.logsumexp(full[list(b.answers.no_ids)], 0)
    torch.testing.assert_close(margins(b, QUESTIONS[:1], images)[0], yes - no, atol=1e-5, rtol=0)


def test_answer_word_must_be_one_token(tiny_bundles):
    tok = tiny_bundles["Gemma3ForConditionalGeneration"].tokenizer
    ans = answer_token_ids(tok, ("yes", "no"))
    assert ans.yes_ids == (tok.convert_tokens_to_ids("yes"),)
    with pytest.raises(MechmedError, match="not one"):
        answer_token_ids(tok, ("yes", "absolutely-not maybe"))
    with pytest.raises(MechmedError, match="not one"):
        answer_token_ids(tok, ("yes", "zzzunknownword"))  # maps to <unk>
    with pytest.raises(MechmedError, match="exactly two"):
        answer_token_ids(tok, ("yes",))


def test_variants_combined_with_a_case_sensitive_tokenizer():
    """'yes', 'Yes' and 'YES' are distinct tokens in a case-sensitive vocabulary: all count."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "yes": 1, "Yes": 2, "YES": 3, "no": 4, "No": 5, "maybe": 6}
    bk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    bk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=bk, unk_token="<unk>")
    ans = answer_token_ids(tok, ("yes", "no"))
    assert set(ans.yes_ids) == {1, 2, 3}
    assert set(ans.no_ids) == {4, 5}
    logits = torch.zeros(1, 7)
    logits[0, 1], logits[0, 2] = 1.0, 2.0
    from mechmed.readout import yes_no_logits

    got = yes_no_logits(logits, ans)
    # by hand: log(e^1 + e^2 + e^0) and log(e^0 + e^0)
    torch.testing.assert_close(got[0], torch.tensor([torch.tensor([1.0, 2.0, 0.0]).exp().sum().log().item(),
                                                     torch.tensor(2.0).log().item()]))


def test_empty_and_mismatched_inputs(tiny_bundles):
    b = tiny_bundles["Gemma3ForConditionalGeneration"]
    with pytest.raises(MechmedError, match="empty"):
        build_inputs(b.processor, [], [])
    with pytest.raises(MechmedError, match="one image per question"):
        build_inputs(b.processor, QUESTIONS[:2], [make_image(0)])
