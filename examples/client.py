from chatenv import ChatAction, ChatEnv

with ChatEnv("http://127.0.0.1:8000") as env:        # http(s)://, ws(s):// or host:port
    env.reset()
    result = env.step(ChatAction(tokens=[72, 105]))  # the embedded tokenizer's ids are UTF-8 bytes
    print(result.observation.messages)               # [{'role': 'assistant', 'content': 'Hi'}]
    print(result.reward, result.done)                # None False
    print(env.state().step_count)                    # 1
