"""Sampling the next token (gpt.sample_next_token) and GPT.generate's penalties and n-gram ban, each against the
distribution or the rule written out."""
import math

import pytest
import torch

import gpt
from gpt import sample_next_token
from test_gpt import random_model


def test_sample_next_token_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draw = lambda **kw: {sample_next_token(logits, generator=g, **kw).item() for _ in range(300)}
    assert draw() == {0, 1, 2, 3}
    assert draw(top_k=2) == {0, 1}
    assert draw(top_p=0.5) == {0}  # token 0 alone holds 0.5
    assert draw(top_p=0.7) == {0, 1}  # 0.5 + 0.3 reaches 0.7
    assert draw(top_p=0.9) == {0, 1, 2}
    assert sample_next_token(logits, temperature=0).item() == 0


def test_the_edges_of_the_sampling_arguments_read_as_the_servers():
    """GPT.generate's own arguments, as session.Sampling reads them: top_p 0 is greedy (it returned the last
    vocabulary id, every token dropped and the NaN clamped away), top_k 0 is off (a shape error), and a negative
    temperature is refused (it sampled the inverted distribution)."""
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3], [0.7, 0.2, 0.1]]))
    g = torch.Generator().manual_seed(0)
    assert sample_next_token(logits, top_p=0.0, generator=g).view(-1).tolist() == [1, 0]
    assert {tuple(sample_next_token(logits, top_k=0, generator=g).view(-1).tolist()) for _ in range(200)} == {
        (a, b) for a in range(3) for b in range(3)}
    for bad in (dict(temperature=-1.0), dict(temperature=math.nan), dict(temperature=math.inf), dict(top_k=-1),
                dict(top_p=-0.1), dict(top_p=1.5), dict(top_p=math.nan)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            sample_next_token(logits, generator=g, **bad)
    model = random_model()
    assert list(model.generate([1, 2, 3], 5, top_p=0.0)) == list(model.generate([1, 2, 3], 5, temperature=0.0))
    with pytest.raises(ValueError, match="temperature"):
        next(model.generate([1, 2, 3], 5, temperature=-1.0))


def test_sample_next_token_follows_the_distribution():
    """Inverse-CDF sampling: each token as often as its probability, a zero-probability token
    never, and each row's token follows from its own random number alone."""
    p = torch.tensor([0.5, 0.3, 0.0, 0.15, 0.05])
    logits = torch.log(p).expand(20_000, -1)
    drawn = sample_next_token(logits, generator=torch.Generator().manual_seed(0)).view(-1)
    freq = torch.bincount(drawn, minlength=5) / len(drawn)
    assert freq[2] == 0
    assert (freq - p).abs().max() < 0.01, freq  # 3.5 standard errors of the largest
    edges = torch.tensor([[0.0], [0.4999], [0.5001], [0.9999]], dtype=torch.float64)
    assert sample_next_token(torch.log(p).expand(4, -1), uniform=edges).view(-1).tolist() == [0, 0, 1, 4]


def test_top_p_keeps_the_most_likely_tokens_wherever_they_stand_in_the_vocabulary():
    """The nucleus is taken in probability order and mapped back to the vocabulary: with the likely tokens
    last in the vocabulary, top_p keeps them and drops the unlikely ones before them."""
    logits = torch.log(torch.tensor([[0.05, 0.15, 0.5, 0.3], [0.3, 0.05, 0.15, 0.5]]))
    g = torch.Generator().manual_seed(0)
    drawn = [set(), set()]
    for _ in range(300):
        for row, t in enumerate(sample_next_token(logits, top_p=0.7, generator=g).view(-1).tolist()):
            drawn[row].add(t)
    assert drawn == [{2, 3}, {3, 0}]


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sample_next_token_divides_the_logits_by_the_temperature(temperature):
    """Each row's random number picks its token from the CDF of softmax(logits / temperature) (written out in
    float64): a low temperature sharpens the distribution, a high one flattens it."""
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    uniform = torch.linspace(0.005, 0.995, 100, dtype=torch.float64)[:, None]
    cdf = (logits.double() / temperature).softmax(-1).cumsum(-1)
    want = torch.searchsorted(cdf, uniform.view(-1), right=True)
    got = sample_next_token(logits.expand(100, -1), temperature=temperature, uniform=uniform).view(-1)
    assert got.tolist() == want.tolist()
    plain = sample_next_token(logits.expand(100, -1), uniform=uniform).view(-1)
    assert got.tolist() != plain.tolist()  # the temperature changed some picks: the comparison is not vacuous


def test_top_k_past_the_vocabulary_keeps_every_token():
    """top_k larger than the vocabulary (a request may ask for 100; the tests' models have 96 tokens): no
    error, the plain distribution."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    uniform = torch.tensor([[0.1], [0.6], [0.9], [0.99]], dtype=torch.float64)
    got = sample_next_token(logits.expand(4, -1), top_k=1000, uniform=uniform).view(-1).tolist()
    assert got == sample_next_token(logits.expand(4, -1), uniform=uniform).view(-1).tolist() == [0, 1, 2, 3]


def test_penalties_follow_openai_and_off_keeps_greedy_exact():
    """OpenAI's frequency and presence penalties in GPT.generate, against the formula written out on full
    forwards: logit - frequency x count - presence x (count > 0), the counts over the tokens generated so far.
    At 0 and 0 the greedy tokens are those of plain argmax."""
    model = random_model()
    prompt = [5, 17, 3]

    def written_out(frequency, presence, n=20):
        ids, counts = list(prompt), torch.zeros(model.config.vocab_size, dtype=torch.float64)
        with torch.no_grad():
            for _ in range(n):
                logits = model(torch.tensor([ids]))[0, -1].double() - frequency * counts - presence * (counts > 0)
                ids.append(int(logits.argmax()))
                counts[ids[-1]] += 1
        return ids[len(prompt):]

    for frequency, presence in [(0.0, 0.0), (0.8, 0.0), (0.0, 1.5), (1.0, 0.5), (-0.5, 0.0)]:
        got = list(model.generate(prompt, 20, temperature=0.0, frequency_penalty=frequency, presence_penalty=presence))
        assert got == written_out(frequency, presence), (frequency, presence)
    assert written_out(0.0, 0.0) != written_out(1.0, 0.5)  # the penalties change this model's greedy answer


def test_repeated_ngram_tokens_are_those_that_would_complete_an_earlier_ngram():
    ids = [7, 8, 9, 7, 8]
    assert gpt.repeated_ngram_tokens(ids, 3) == [9]  # 7 8 -> 9 was said
    assert gpt.repeated_ngram_tokens(ids, 2) == [9]  # 8 -> 9 was said
    assert sorted(gpt.repeated_ngram_tokens(ids, 1)) == [7, 7, 8, 8, 9]  # every token used before
    assert gpt.repeated_ngram_tokens(ids, 4) == []  # no earlier 4-gram starts with 9 7 8
    assert gpt.repeated_ngram_tokens([1, 2, 1, 2, 1, 2], 3) == [1, 1]
    assert gpt.repeated_ngram_tokens([1, 2], 3) == [] and gpt.repeated_ngram_tokens([], 2) == []


def test_no_repeat_ngram_size_never_repeats_an_ngram_of_the_answer():
    """With no_repeat_ngram_size n, greedy decoding takes at each step the best token that does not
    complete an n-gram the answer already has (written out on full forwards), so no n-gram of the answer
    occurs twice, while this random model's plain greedy answer loops. The prompt does not count."""
    model = random_model()
    prompt = [5, 17, 3, 5, 17]

    def written_out(n, steps=40):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(steps):
                logits = model(torch.tensor([ids]))[0, -1].double()
                answer = ids[len(prompt):]
                for i in range(len(answer) - n + 1):
                    if n == 1 or answer[i:i + n - 1] == answer[len(answer) - n + 1:]:
                        logits[answer[i + n - 1]] = -math.inf
                ids.append(int(logits.argmax()))
        return ids[len(prompt):]

    def ngrams(ids, n):
        return [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]

    plain = list(model.generate(prompt, 40, temperature=0.0))
    assert len(set(ngrams(plain, 3))) < len(ngrams(plain, 3))  # the model loops without the ban
    for n in (1, 2, 3, 4):
        got = list(model.generate(prompt, 40, temperature=0.0, no_repeat_ngram_size=n))
        assert got == written_out(n), n
        assert len(set(ngrams(got, n))) == len(ngrams(got, n)), n
    assert list(model.generate(prompt, 40, temperature=0.0, no_repeat_ngram_size=0)) == plain
