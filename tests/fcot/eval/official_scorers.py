"""The official scorers' definitions, written out independently of fcot.eval.metrics in the
shape the official scripts have, as the oracle the metric tests compare against:

- ``rrc_anls``: the Robust Reading Competition DocVQA script (lmms-eval's ``anls``);
- ``pix2struct_relaxed``: pix2struct's ``relaxed_correctness`` (lmms-eval's ChartQA);
- ``EvalAIProcessor`` + ``mmf_textvqa_accuracy``: MMF's TextVQA evaluator (lmms-eval's
  TextVQA/VQAv2 ``process_results``);
- ``VQAv2Eval``: the official VQA evaluation script's ``evaluate`` loop for one question.

Each is a transcription of the published algorithm (not a copy of its code); the contraction
table is the published one, as data.
"""

from __future__ import annotations

import re

CONTRACTION_PAIRS = """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've|couldnt've couldn't've|
didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've|hadn'tve hadn't've|hasnt hasn't|havent haven't|
hed he'd|hed've he'd've|he'dve he'd've|hes he's|howd how'd|howll how'll|hows how's|Id've I'd've|I'dve I'd've|Im I'm|
Ive I've|isnt isn't|itd it'd|itd've it'd've|it'dve it'd've|itll it'll|let's let's|maam ma'am|mightnt mightn't|
mightnt've mightn't've|mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've|neednt needn't|
notve not've|oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at|'ow'sat 'ow's'at|shant shan't|
shed've she'd've|she'dve she'd've|she's she's|shouldve should've|shouldnt shouldn't|shouldnt've shouldn't've|
shouldn'tve shouldn't've|somebody'd somebodyd|somebodyd've somebody'd've|somebody'dve somebody'd've|
somebodyll somebody'll|somebodys somebody's|someoned someone'd|someoned've someone'd've|someone'dve someone'd've|
someonell someone'll|someones someone's|somethingd something'd|somethingd've something'd've|
something'dve something'd've|somethingll something'll|thats that's|thered there'd|thered've there'd've|
there'dve there'd've|therere there're|theres there's|theyd they'd|theyd've they'd've|they'dve they'd've|
theyll they'll|theyre they're|theyve they've|twas 'twas|wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've|
werent weren't|whatll what'll|whatre what're|whats what's|whatve what've|whens when's|whered where'd|wheres where's|
whereve where've|whod who'd|whod've who'd've|who'dve who'd've|wholl who'll|whos who's|whove who've|whyll why'll|
whyre why're|whys why's|wont won't|wouldve would've|wouldnt wouldn't|wouldnt've wouldn't've|wouldn'tve wouldn't've|
yall y'all|yall'll y'all'll|y'allll y'all'll|yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've|
youd you'd|youd've you'd've|you'dve you'd've|youll you'll|youre you're|youve you've
"""
CONTRACTIONS = dict(p.split() for p in CONTRACTION_PAIRS.replace("\n", "").split("|"))
MANUAL_MAP = dict(zip("none zero one two three four five six seven eight nine ten".split(),
                      "0 0 1 2 3 4 5 6 7 8 9 10".split()))
ARTICLES = ["a", "an", "the"]
PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")


def process_punctuation(in_text):
    out_text = in_text
    for p in PUNCT:
        if (p + " " in in_text or " " + p in in_text) or (re.search(COMMA_STRIP, in_text) is not None):
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    return PERIOD_STRIP.sub("", out_text, re.UNICODE)  # the scripts' call: re.UNICODE lands in `count`


def process_digit_article(in_text):
    out = []
    for word in in_text.lower().split():
        word = MANUAL_MAP.setdefault(word, word)
        if word not in ARTICLES:
            out.append(word)
    for i, word in enumerate(out):
        if word in CONTRACTIONS:
            out[i] = CONTRACTIONS[word]
    return " ".join(out)


class EvalAIProcessor:
    def word_tokenize(self, word):
        return word.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()

    def __call__(self, item):
        item = self.word_tokenize(item)
        item = item.replace("\n", " ").replace("\t", " ").strip()
        return process_digit_article(process_punctuation(item))


def mmf_textvqa_accuracy(pred, gt_answers):
    proc = EvalAIProcessor()
    answers = [proc(a) for a in gt_answers]
    pred = proc(pred)
    scores = {}
    for unique in set(answers):
        accs = []
        gts = list(enumerate(answers))
        for gt in gts:
            others = [item for item in gts if item != gt]
            accs.append(min(1, float(len([o for o in others if o[1] == unique])) / 3))
        scores[unique] = sum(accs) / len(accs)
    return scores.get(pred, 0.0)


class VQAv2Eval:
    """One question of the official VQAv2 ``VQAEval.evaluate`` loop."""

    def evaluate(self, res_ans, gt_answers):
        gts = [{"answer": a, "answer_id": i} for i, a in enumerate(gt_answers)]
        res_ans = res_ans.replace("\n", " ").replace("\t", " ").strip()
        res_ans = process_digit_article(process_punctuation(res_ans))
        for d in gts:
            d["answer"] = d["answer"].replace("\n", " ").replace("\t", " ").strip()
        if len(set(d["answer"] for d in gts)) > 1:
            for d in gts:
                d["answer"] = process_punctuation(d["answer"])
        acc = []
        for gt in gts:
            others = [item for item in gts if item != gt]
            acc.append(min(1, float(len([o for o in others if o["answer"] == res_ans])) / 3))
        return float(sum(acc)) / len(acc)


def _levenshtein(s1, s2):
    if len(s1) > len(s2):
        s1, s2 = s2, s1
    distances = range(len(s1) + 1)
    for i2, c2 in enumerate(s2):
        new = [i2 + 1]
        for i1, c1 in enumerate(s1):
            new.append(distances[i1] if c1 == c2 else 1 + min((distances[i1], distances[i1 + 1], new[-1])))
        distances = new
    return distances[-1]


def rrc_anls(prediction, answers, threshold=0.5):
    values = []
    for answer in answers:
        gt = " ".join(answer.strip().lower().split())
        det = " ".join(prediction.strip().lower().split())
        dist = _levenshtein(gt, det)
        length = max(len(answer.upper()), len(prediction.upper()))
        values.append(0.0 if length == 0 else float(dist) / float(length))
    result = 1 - min(values)
    return 0 if result < threshold else result


def pix2struct_relaxed(prediction, target, max_relative_change=0.05):
    def to_float(text):
        try:
            if text.endswith("%"):
                return float(text.rstrip("%")) / 100.0
            return float(text)
        except ValueError:
            return None

    p, t = to_float(prediction), to_float(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= max_relative_change
    return prediction.lower() == target.lower()
