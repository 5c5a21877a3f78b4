"""The request pipeline shared by synchronous requests and job workers."""
