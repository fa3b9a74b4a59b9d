from flight_server.launch import serve

serve()
