"""A deterministic user environment for tests (named on the command line as `tests/envs/letter_env.py:LetterEnv`)."""

from posttrain.envs import StepResult


class LetterEnv:
    """Two turns; each turn's reward is the fraction of lowercase letters the model wrote; the observation depends on
    the row and the turn (ragged chunks); verifier 1 when the last turn is mostly lowercase letters."""

    def reset(self, row):
        self.t, self.prompt = 0, row["prompt"]
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, text):
        self.t += 1
        score = sum(c.isalpha() and c.islower() for c in text) / max(len(text), 1)
        observation = f"Observation: {self.prompt[-self.t * 3:]} again\n"
        return StepResult(observation, score, self.t >= 2, {"verifier": float(score > 0.5)})
