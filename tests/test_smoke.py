def test_balance_of_new_user(client, auth, user_id):
    response = client.get("/api/billing/credits", headers=auth(user_id))
    assert response.status_code == 200, response.json
    assert response.json["balance_usdc"] == "0.0000000"
