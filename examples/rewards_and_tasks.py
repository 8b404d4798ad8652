from chatenv import ByteTokenizer, ChatAction, ChatEnv

KNOWN = {"apples": 8, "train": 120, "books": 15, "pencils": 12}  # what the scripted policy believes
tokenizer = ByteTokenizer()
with ChatEnv("http://127.0.0.1:8000") as env:
    rewards = []
    for index in range(env.num_tasks("train")):
        result = env.reset(split="train", index=index)
        task_id = result.observation.metadata["task"]["id"]
        reply = f"The answer is \\boxed{{{KNOWN.get(task_id, 0)}}}."
        result = env.step(ChatAction(tokens=tokenizer.encode(reply)))
        rewards.append(result.reward)
    print(f"mean reward {sum(rewards) / len(rewards):.3f}")  # mean reward 0.375
