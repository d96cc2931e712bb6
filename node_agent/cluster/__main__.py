from node_agent.cluster.cli import main

main()
