import asyncio

from chatenv import AsyncChatEnv, ChatAction


async def main():
    async with AsyncChatEnv("http://127.0.0.1:8000") as env:
        await env.reset()
        result = await env.step(ChatAction(tokens=[72, 105]))
        print(result.observation.messages)           # [{'role': 'assistant', 'content': 'Hi'}]
        print((await env.state()).step_count)        # 1

asyncio.run(main())
