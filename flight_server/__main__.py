from flight_server.cli import main

main()
