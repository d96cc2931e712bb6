from node_agent.agent.cli import main

main()
